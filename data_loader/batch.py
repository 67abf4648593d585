"""What the data set yields: one ``Item`` per (video, caption index), and the ``Batch`` that
``collate`` stacks from them. Tokens are kept per text input (the student's, a teacher's, the
pooling mask's: ``TextInput.name``) and per language."""
from dataclasses import dataclass

import torch

# Text input name of the student's tokens.
STUDENT = "student"
# Text input name of the tokens whose attention mask a converted reference teacher pools with (docs/reference.md §2.3).
POOL_MASK = "pool_mask"


@dataclass
class Tokens:
    """Token ids and attention mask of one caption ([L]) or of a batch of captions ([B, L])."""
    input_ids: torch.Tensor
    attention_mask: torch.Tensor

    def map(self, fn):
        return Tokens(fn(self.input_ids), fn(self.attention_mask))

    @staticmethod
    def cat(parts, join=torch.cat):
        """``parts`` joined along the first dimension (``join=torch.stack``: along a new one)."""
        return Tokens(join([t.input_ids for t in parts]), join([t.attention_mask for t in parts]))


@dataclass
class Item:
    """One entry of a RetrievalDataset."""
    index: int                 # position of the item (video) in the corpus
    caption_index: int         # which of its captions, shared by every language
    video: torch.Tensor        # [frames, feature_dim], L2-normalised frames, zero-padded
    video_mask: torch.Tensor   # [frames] bool, True for real frames
    text: dict                 # {text input name: {language: Tokens}}
    has_caption: dict          # {language: bool}; without a caption the tokens are all padding


@dataclass
class Batch:
    """Items stacked along a first dimension of size B (``collate``)."""
    index: torch.Tensor          # [B] long
    caption_index: torch.Tensor  # [B] long
    video: torch.Tensor          # [B, frames, feature_dim]
    video_mask: torch.Tensor     # [B, frames] bool
    text: dict                   # {text input name: {language: Tokens [B, L]}}
    has_caption: dict            # {language: [B] bool}

    @property
    def student(self):
        """{language: Tokens} of the languages the student reads."""
        return self.text[STUDENT]

    def pool_masks(self, languages):
        """{language: [B, L]} masks a converted reference teacher pools with, or None when the batch has none."""
        pool = self.text.get(POOL_MASK)
        return {lang: pool[lang].attention_mask for lang in languages} if pool is not None else None

    def __len__(self):
        return len(self.index)

    def map(self, fn):
        """The batch with ``fn`` applied to each of its tensors."""
        return Batch(fn(self.index), fn(self.caption_index), fn(self.video), fn(self.video_mask),
                     {name: {lang: t.map(fn) for lang, t in per_lang.items()} for name, per_lang in self.text.items()},
                     {lang: fn(v) for lang, v in self.has_caption.items()})

    def to(self, device):
        return self.map(lambda t: t.to(device, non_blocking=True))

    def pin_memory(self):  # called by a DataLoader with pin_memory=True
        return self.map(torch.Tensor.pin_memory)

    def split(self, parts):
        """``parts`` micro-batches along the first dimension (gradient accumulation), as ``Tensor.chunk`` cuts."""
        chunks = self.map(lambda t: t.chunk(parts))  # each tensor cut once; the fields hold the pieces
        return [chunks.map(lambda pieces, i=i: pieces[i]) for i in range(parts)]


def collate(items):
    """A Batch of a list of Items."""
    first = items[0]
    return Batch(
        index=torch.tensor([it.index for it in items], dtype=torch.long),
        caption_index=torch.tensor([it.caption_index for it in items], dtype=torch.long),
        video=torch.stack([it.video for it in items]),
        video_mask=torch.stack([it.video_mask for it in items]),
        text={name: {lang: Tokens.cat([it.text[name][lang] for it in items], join=torch.stack) for lang in per_lang}
              for name, per_lang in first.text.items()},
        has_caption={lang: torch.tensor([it.has_caption[lang] for it in items], dtype=torch.bool)
                     for lang in first.has_caption})
