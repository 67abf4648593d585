"""Section 1, data pipeline: items per second of the project's loader against a reference-style one."""
import random

import torch

from utils.benchmark import TEACHER_ENCODERS
from utils.benchmark.timing import interleaved, median
from data_loader.corpus import ENGLISH, Corpus

# The reference's teacher suffixes (docs/reference.md §1.3), in the order of TEACHER_ENCODERS.
TEACHER_SUFFIXES = ("xlm", "mbert", "distill")


def tile_corpus(corpus, n_items):
    """The first ``n_items`` items of ``corpus``, repeated as often as needed."""
    idx = [i % len(corpus) for i in range(n_items)]
    return Corpus(path=corpus.path, ids=[f"{corpus.ids[i]}#{k}" for k, i in enumerate(idx)],
                  features=[corpus.features[i] for i in idx],
                  captions={lang: [caps[i] for i in idx] for lang, caps in corpus.captions.items()})


class ReferenceStyleDataset(torch.utils.data.Dataset):
    """Tokenizes on every access, as the reference's loaders did (docs/reference.md §1.3).

    Per item: one caption index drawn with Python's ``random`` and shared by all languages; the
    English caption regex-cleaned and tokenized by the student and by every teacher tokenizer;
    then the caption of every language tokenized by the student and by every teacher tokenizer.
    Each call pads to ``max_words`` and returns tensors with the reference's shapes (input ids
    [L], attention mask [1, L], no token type ids). The word2vec lookup and the audio padding
    the reference also did per item are left out, so this loader is, if anything, faster than
    the reference's.
    """

    def __init__(self, corpus, student_tokenizer, teacher_tokenizers, max_words, n_video_tokens):
        self.corpus, self.student, self.teachers = corpus, student_tokenizer, dict(teacher_tokenizers)
        self.max_words, self.n_video_tokens = max_words, n_video_tokens

    def __len__(self):
        return len(self.corpus)

    def _tokenize(self, tokenizer, text):
        enc = tokenizer(text, padding="max_length", max_length=self.max_words, truncation=True,
                        return_tensors="pt")
        return {"input_ids": enc["input_ids"].squeeze(0), "attention_mask": enc["attention_mask"]}

    def __getitem__(self, idx):
        from data_loader.dataset import clean_caption, video_tokens
        video, video_mask = video_tokens(self.corpus.features[idx], self.n_video_tokens)
        cap = random.randrange(max(1, len(self.corpus.captions[ENGLISH][idx])))
        raw_text = clean_caption(self.corpus.captions[ENGLISH][idx][cap])
        out = {"index": idx, "video": video, "video_mask": video_mask,
               "tokens": self._tokenize(self.student, raw_text)}
        for suffix, tok in self.teachers.items():
            out[f"tokens_{suffix}"] = self._tokenize(tok, raw_text)
        for lang, captions in self.corpus.captions.items():
            caps = captions[idx]
            text = caps[min(cap, len(caps) - 1)] if caps else ""
            out[lang] = self._tokenize(self.student, text)
            for suffix, tok in self.teachers.items():
                out[f"{lang}_{suffix}"] = self._tokenize(tok, text)
        return out


def _epoch(loader, batch_items=len):
    items = 0
    for batch in loader:
        items += batch_items(batch)
    return items


def bench_data(assets, n_items=None, repeats=3, batch_size=64, max_words=35, n_video_tokens=30):
    """Items per second of the project's loader against the reference-style loader."""
    from data_loader.readers import read_corpus
    from data_loader.batch import STUDENT
    from data_loader.dataset import EnglishReading, RetrievalDataset, TextInput
    from data_loader.loaders import EpochSampler, make_loader
    from model.model import load_tokenizer

    corpus = read_corpus(assets["train"], "multi-msrvtt", "2d", "train")
    n_items = n_items or len(corpus)
    corpus = tile_corpus(corpus, n_items)
    student = load_tokenizer(str(assets["encoders"]["labse-tiny"]))
    teachers = {s: load_tokenizer(str(assets["encoders"][name])) for s, name in zip(TEACHER_SUFFIXES, TEACHER_ENCODERS)}
    # The c2kd setup with online teachers: the student reads every language, each teacher English.
    inputs = [TextInput(STUDENT, student, corpus.languages),
              *(TextInput(f"teacher{i}", tok, [ENGLISH], EnglishReading(teacher=True, clean=True))
                for i, tok in enumerate(teachers.values()))]

    def sampler():
        return EpochSampler(n_items, batch_size, seed=0, shuffle=True, drop_last=False)

    state = {}

    def project_setup():
        state["dataset"] = RetrievalDataset(corpus, inputs, max_words, n_video_tokens, train=True, seed=0)

    def project_epoch():
        assert _epoch(make_loader(state["dataset"], batch_size, sampler(), 0, seed=0)) == n_items

    reference = ReferenceStyleDataset(corpus, student, teachers, max_words, n_video_tokens)

    def reference_epoch():  # torch's default collate: the reference's batches were dicts of tensors
        loader = torch.utils.data.DataLoader(reference, batch_size, sampler=sampler(), num_workers=0,
                                             generator=torch.Generator().manual_seed(0))
        assert _epoch(loader, lambda batch: len(batch["index"])) == n_items

    random.seed(0)
    project_setup()  # warm-up: first use of each tokenizer, allocator
    project_epoch()
    reference_epoch()
    times = interleaved({"project_setup": project_setup, "project_epoch": project_epoch,
                         "reference_epoch": reference_epoch}, repeats)
    setup, epoch, ref = (median(times[k]) for k in ("project_setup", "project_epoch", "reference_epoch"))
    return {
        "items": n_items, "batch_size": batch_size, "languages": corpus.languages,
        "captions_per_item": float(sum(len(c) for c in corpus.captions[ENGLISH]) / n_items),
        "max_words": max_words, "n_video_tokens": n_video_tokens, "num_workers": 0, "repeats": repeats,
        "tokenizers": {"student": "labse-tiny", "teachers": list(TEACHER_ENCODERS)},
        "tokenizer_calls_per_item": {"project": 0,
                                     "reference": (1 + len(teachers)) * (1 + len(corpus.languages))},
        "project_setup_s": setup,
        "project_epoch_s": epoch,
        "reference_epoch_s": ref,
        "project_items_per_s": n_items / epoch,
        "reference_items_per_s": n_items / ref,
        "steady_state_ratio": ref / epoch,
        "one_epoch_with_setup_ratio": ref / (setup + epoch),
        "samples_s": times,
    }

