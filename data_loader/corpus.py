"""Readers that turn a dataset file into a ``Corpus``: ids, frame features, captions per language.

A reader knows one on-disk layout; everything downstream (tokenization, batching,
evaluation) sees only the ``Corpus``. Readers are registered by layout name so a
config names its layout and new layouts slot in without touching the data set code.
"""
from dataclasses import dataclass, field

import numpy as np

from data_loader.safe_pickle import DataFileError, load_pickle


@dataclass
class Corpus:
    """One split of a dataset, aligned by item position.

    ``captions[lang][i]`` is the list of captions of item ``i`` in ``lang``; within an
    item, caption ``k`` of every language is the translation of the same English caption
    (the released Multi-MSRVTT training layout), so one caption index serves all languages.
    An empty list means the item has no caption in that language.
    """
    path: str
    ids: list
    features: list                 # per item: float32 array [frames, feature_dim]
    captions: dict                 # lang -> list (per item) of lists of strings
    extras: list = field(default_factory=list)  # per item: fields readers keep but training ignores

    def __len__(self):
        return len(self.ids)

    @property
    def languages(self):
        return list(self.captions)

    @property
    def feature_dim(self):
        return next((f.shape[1] for f in self.features if f.ndim == 2), 0)

    def select_languages(self, languages):
        """Keep ``languages`` in that order; a language the data lacks is a one-line error."""
        missing = [lang for lang in languages if lang not in self.captions]
        if missing:
            raise DataFileError(
                f"{self.path}: no captions for language(s) {', '.join(missing)}; "
                f"the file has {', '.join(self.captions) or 'none'}")
        self.captions = {lang: self.captions[lang] for lang in languages}
        return self


READERS = {}


def register_reader(name):
    def wrap(fn):
        READERS[name] = fn
        return fn
    return wrap


def read_corpus(path, layout, feature_key, split):
    """Read ``path`` with the reader registered for ``layout``; ``split`` is 'train' or 'eval'."""
    if layout not in READERS:
        raise DataFileError(f"unknown data layout '{layout}'; known: {', '.join(sorted(READERS))}")
    return READERS[layout](path, feature_key=feature_key, split=split)


def _features(item, key, path, index):
    if key not in item:
        present = sorted(k for k, v in item.items() if isinstance(v, np.ndarray))
        raise DataFileError(
            f"{path}: item {index} has no feature key '{key}' (array keys present: "
            f"{', '.join(present) or 'none'})")
    feats = np.asarray(item[key], dtype=np.float32)
    if feats.ndim != 2:
        raise DataFileError(f"{path}: item {index} feature '{key}' has shape {feats.shape}, "
                            "expected [frames, dim]")
    return feats


def _as_list_of_dicts(data, path):
    if not isinstance(data, list) or not all(isinstance(x, dict) for x in data):
        raise DataFileError(f"{path}: expected a list of dicts (the released layout), "
                            f"got {type(data).__name__}")
    if not data:
        raise DataFileError(f"{path}: the file holds no items")
    return data


@register_reader("multi-msrvtt")
def read_multi_msrvtt(path, feature_key, split):
    """Multi-MSRVTT and VATEX pickles (reference §1.2).

    Training items hold ``caption_<lang>`` lists aligned by index; evaluation items hold one
    ``eval_caption_<lang>`` string per language. Languages are the caption keys found in
    the file; a language is kept only if every item has it.
    """
    data = _as_list_of_dicts(load_pickle(path), path)
    prefix = "caption_" if split == "train" else "eval_caption_"
    per_item_langs = [{k[len(prefix):] for k in item if k.startswith(prefix)} for item in data]
    languages = sorted(set.intersection(*per_item_langs))
    if not languages:
        raise DataFileError(f"{path}: no '{prefix}<lang>' keys shared by all items "
                            f"(is this a {'training' if split == 'train' else 'test'} file?)")
    # English first: it is the pivot language of every stage.
    languages.sort(key=lambda lang: lang != "en")
    ids, features, extras = [], [], []
    captions = {lang: [] for lang in languages}
    for i, item in enumerate(data):
        ids.append(str(item.get("id", i)))
        features.append(_features(item, feature_key, path, i))
        for lang in languages:
            value = item[prefix + lang]
            captions[lang].append([value] if isinstance(value, str) else [str(c) for c in value])
        extras.append({k: v for k, v in item.items()
                       if k not in ("id", feature_key) and not k.startswith(("caption_", "eval_caption_"))
                       and not isinstance(v, np.ndarray)})
    for lang in languages:
        for i, caps in enumerate(captions[lang]):
            if "en" in captions and len(caps) != len(captions["en"][i]):
                raise DataFileError(
                    f"{path}: item {ids[i]} has {len(caps)} '{prefix}{lang}' captions but "
                    f"{len(captions['en'][i])} English ones; captions must be aligned by index")
    return Corpus(path=str(path), ids=ids, features=features, captions=captions, extras=extras)
