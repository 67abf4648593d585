"""A torch Dataset over a Corpus: pre-tokenized captions and padded video tokens.

Every caption is tokenized once, when the data set is built, by each tokenizer that is
actually in use (the reference tokenized every caption with five to seven tokenizers on
every access, docs/reference.md §1.3). Items carry their position and caption index so that cached
teacher outputs can be looked up for the batch.
"""
import re
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

from data_loader.batch import Item, Tokens
from data_loader.corpus import ENGLISH


@dataclass(frozen=True)
class EnglishReading:
    """Which English captions a text encoder reads, and how.

    A student reads the corpus' English captions as written. An English-input teacher (config key
    ``model.role = teacher``) reads the teachers' English (``Corpus.teacher_english`` where the file
    keeps one apart, YouCook2's ``caption``), regex-cleaned (words matching ``[\\w']+`` joined by
    spaces) where the dataset's recipe says its teachers read it so (``data.clean_english``, docs/reference.md §1.3).
    """
    teacher: bool = False
    clean: bool = False

    @classmethod
    def of(cls, config):
        """The reading a resolved config describes (a saved one goes through
        ``parse_config.upgrade_saved_config`` first)."""
        teacher = config["model"]["role"] == "teacher"
        return cls(teacher=teacher, clean=teacher and config["data"]["clean_english"])

    def captions(self, corpus):
        """Per item, the English captions this reading takes from ``corpus`` (before cleaning)."""
        if self.teacher and corpus.teacher_english is not None:
            return corpus.teacher_english
        return corpus.captions[ENGLISH]

    def describe(self):
        return "regex-cleaned English" if self.clean else "English as written"


@dataclass
class TextInput:
    """How one text encoder sees the captions.

    ``name`` keys this encoder's tokens in the batch (``Batch.text``), ``languages`` are the caption languages it
    reads, and ``english`` says which English captions it reads and how (``EnglishReading``); every
    other language is read as written.
    """
    name: str
    tokenizer: object
    languages: list
    english: EnglishReading = EnglishReading()


_WORD = re.compile(r"[\w']+")


def clean_caption(text):
    return " ".join(_WORD.findall(text))


def video_tokens(features, n_tokens):
    """First ``n_tokens`` frames, each L2-normalised, zero-padded; mask marks real frames (docs/reference.md §1.4)."""
    frames = torch.from_numpy(np.ascontiguousarray(features[:n_tokens], dtype=np.float32))
    out = torch.zeros(n_tokens, features.shape[1])
    mask = torch.zeros(n_tokens, dtype=torch.bool)
    if len(frames):
        out[:len(frames)] = torch.nn.functional.normalize(frames, dim=1, eps=1e-12)
        mask[:len(frames)] = True
    return out, mask


class TokenTable:
    """All captions of one language under one tokenizer, as padded int tensors."""

    def __init__(self, captions_per_item, tokenizer, max_words, clean):
        counts = [len(caps) for caps in captions_per_item]
        self.offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        flat = [clean_caption(c) if clean else c for caps in captions_per_item for c in caps]
        if flat:
            enc = tokenizer(flat, padding="max_length", truncation=True, max_length=max_words,
                            return_tensors="np", return_token_type_ids=False)
            self.input_ids = torch.from_numpy(enc["input_ids"].astype(np.int32))
            self.attention_mask = torch.from_numpy(enc["attention_mask"].astype(np.bool_))
        else:
            self.input_ids = torch.zeros(0, max_words, dtype=torch.int32)
            self.attention_mask = torch.zeros(0, max_words, dtype=torch.bool)
        self.max_words = max_words

    def row(self, item, caption_index):
        start, end = self.offsets[item], self.offsets[item + 1]
        if start == end:  # no caption in this language: an all-padding row, flagged by has_caption
            return Tokens(torch.zeros(self.max_words, dtype=torch.long), torch.zeros(self.max_words, dtype=torch.long))
        r = start + min(caption_index, end - start - 1)
        return Tokens(self.input_ids[r].long(), self.attention_mask[r].long())


class RetrievalDataset(Dataset):
    """Training view: one entry per video, one caption index per video per epoch, shared by all
    languages (docs/reference.md §1.3). Evaluation view: one entry per (video, caption) pair."""

    def __init__(self, corpus, text_inputs, max_words, n_video_tokens, train, seed=0):
        self.corpus = corpus
        self.n_video_tokens = n_video_tokens
        self.train = train
        self.seed = seed
        self.text_inputs = list(text_inputs)
        self.languages = corpus.languages
        self.tables = {
            ti.name: {lang: TokenTable(ti.english.captions(corpus) if lang == ENGLISH else corpus.captions[lang],
                                       ti.tokenizer, max_words, clean=ti.english.clean and lang == ENGLISH)
                      for lang in ti.languages}
            for ti in self.text_inputs
        }
        # [items, languages]: captions of each item in each language
        self.caption_counts = np.array([[len(corpus.captions[lang][i]) for lang in self.languages]
                                        for i in range(len(corpus))], dtype=np.int64).reshape(len(corpus), -1)
        self.num_captions = self.caption_counts.max(axis=1, initial=0)
        if train:
            self.set_epoch(0)
        else:
            self.pairs = [(i, k) for i in range(len(corpus)) for k in range(max(1, self.num_captions[i]))]

    def set_epoch(self, epoch):
        """Draw this epoch's caption index per video from (seed, epoch), so runs and resumes agree."""
        rng = np.random.default_rng([self.seed, epoch])
        self.caption_choice = (rng.random(len(self.corpus)) * np.maximum(self.num_captions, 1)).astype(np.int64)

    def __len__(self):
        return len(self.corpus) if self.train else len(self.pairs)

    def __getitem__(self, idx):
        item, cap = (idx, int(self.caption_choice[idx])) if self.train else self.pairs[idx]
        video, video_mask = video_tokens(self.corpus.features[item], self.n_video_tokens)
        text = {name: {lang: table.row(item, cap) for lang, table in per_lang.items()}
                for name, per_lang in self.tables.items()}
        # Training draws one caption index for all languages and a language with fewer captions
        # uses its last one (TokenTable.row); evaluation ranks each caption once, so pair k of a
        # video has a caption in a language only if that language has a k-th caption.
        present = self.caption_counts[item] > (0 if self.train else cap)
        has_caption = {lang: bool(p) for lang, p in zip(self.languages, present)}
        return Item(item, cap, video, video_mask, text, has_caption)
