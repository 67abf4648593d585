"""The ``Corpus`` every reader returns (ids, frame features, captions per language), the files of
this project's safe layout, and the checks of items that would poison training.

Readers of each on-disk layout, and their registry, are in ``data_loader.readers``. The safe
layout is pickle-free: a JSON file of ids and captions plus one safetensors or .npy array of
concatenated frames (``safe_files``, ``read_safe_raw``; docs/datasets.md).
"""
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from data_loader.safe_pickle import DataFileError
from common.errors import first_line

# The pivot language: the teachers read it, zero-shot training uses it alone, every stage needs it.
ENGLISH = "en"


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
    unread_fields: list = field(default_factory=list)  # fields of the source items that are not plain data
    # The English captions the teachers read where they differ from the students' English (YouCook2
    # under data.student_english = caption_en; RUDDER items without English under the last_available
    # fallback); None: the teachers read captions["en"].
    teacher_english: list = None

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
                f"{self.path}: no captions for language(s) {', '.join(missing)} (config key 'languages'); "
                f"the file has {', '.join(self.captions) or 'none'}")
        self.captions = {lang: self.captions[lang] for lang in languages}
        return self


# ---- the safe layout -----------------------------------------------------------------------------

SAFE_FORMAT = "c2kd-safe"
SAFE_VERSION = 1


@dataclass
class SafeFiles:
    captions: Path            # captions.json (or <base>.json)
    features: Path            # features.safetensors / features.npy (or <base>.safetensors / <base>.npy)
    offsets: Path = None      # offsets.npy (or <base>.offsets.npy); None for safetensors


def safe_files(path, must_exist=True):
    """The files of a safe-layout split. ``path`` is either a folder holding ``captions.json`` and
    ``features.safetensors`` (or ``features.npy`` + ``offsets.npy``), or a base path ``B`` for
    ``B.json`` and ``B.safetensors`` (or ``B.npy`` + ``B.offsets.npy``); ``B.json`` itself is accepted."""
    p = Path(path)
    if p.is_dir():
        cands = (p / "captions.json", p / "features.safetensors", p / "features.npy", p / "offsets.npy")
    else:
        if p.name.endswith(".offsets.npy"):
            p = p.with_name(p.name[:-len(".offsets.npy")])
        elif p.suffix in (".json", ".safetensors", ".npy"):
            p = p.with_suffix("")
        cands = tuple(p.with_name(p.name + ext) for ext in (".json", ".safetensors", ".npy", ".offsets.npy"))
    captions, st, npy, offsets = cands
    if not must_exist:
        return SafeFiles(captions, st)
    if not captions.is_file():
        raise DataFileError(f"{path}: no {captions.name} (a safe-layout split is a folder with captions.json "
                            "and features.safetensors, or a base path B with B.json and B.safetensors)")
    if st.is_file():
        return SafeFiles(captions, st)
    if npy.is_file():
        if not offsets.is_file():
            raise DataFileError(f"{path}: {npy.name} needs {offsets.name} beside it (item i has frames "
                                "offsets[i]:offsets[i+1])")
        return SafeFiles(captions, npy, offsets)
    raise DataFileError(f"{path}: no features file ({st.name}, or {npy.name} with {offsets.name})")


def is_safe_path(path):
    p = Path(path)
    if p.is_dir():
        return True
    try:
        return safe_files(p, must_exist=False).captions.is_file()
    except (ValueError, OSError):
        return False


def _load_safe_arrays(files):
    name = files.features
    try:
        if files.offsets is None:
            from safetensors.numpy import load_file
            tensors = load_file(str(name))
            missing = [k for k in ("features", "offsets") if k not in tensors]
            if missing:
                raise DataFileError(f"{name}: no tensor named {' or '.join(repr(k) for k in missing)} "
                                    f"(tensors: {', '.join(sorted(tensors)) or 'none'})")
            return tensors["features"], tensors["offsets"]
        return np.load(name, allow_pickle=False), np.load(files.offsets, allow_pickle=False)
    except DataFileError:
        raise
    except Exception as e:  # safetensors and numpy raise several types for a damaged file
        raise DataFileError(f"{name}: not a readable array file ({type(e).__name__}: {first_line(e)})") from None


def read_safe_raw(path):
    """(meta dict, features array as stored, offsets array), checked; ``check`` uses the raw dtype."""
    files = safe_files(path)
    try:
        meta = json.loads(files.captions.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise DataFileError(f"{files.captions}: cannot read ({e})") from None
    except json.JSONDecodeError as e:
        raise DataFileError(f"{files.captions}: not valid JSON (line {e.lineno} column {e.colno}: {e.msg})") from None
    if not isinstance(meta, dict):
        raise DataFileError(f"{files.captions}: expected a JSON object with ids, feature_key and captions")
    if meta.get("format", SAFE_FORMAT) != SAFE_FORMAT:
        raise DataFileError(f"{files.captions}: format is {meta.get('format')!r}, expected {SAFE_FORMAT!r}")
    if not isinstance(meta.get("version", SAFE_VERSION), int) or meta.get("version", SAFE_VERSION) > SAFE_VERSION:
        raise DataFileError(f"{files.captions}: version {meta.get('version')!r} is newer than this reader "
                            f"(version {SAFE_VERSION})")
    for key, kind in (("ids", list), ("captions", dict), ("feature_key", str)):
        if not isinstance(meta.get(key), kind):
            raise DataFileError(f"{files.captions}: field '{key}' must be a JSON "
                                f"{'array' if kind is list else 'object' if kind is dict else 'string'}")
    feats, offsets = _load_safe_arrays(files)
    n = len(meta["ids"])
    if feats.ndim != 2:
        raise DataFileError(f"{files.features}: features have shape {tuple(feats.shape)}, expected [frames, dim]")
    if feats.dtype.kind != "f":
        raise DataFileError(f"{files.features}: features have dtype {feats.dtype}, expected a float type")
    if offsets.ndim != 1 or offsets.dtype.kind not in "iu":
        raise DataFileError(f"{files.offsets or files.features}: offsets must be a 1-D integer array, "
                            f"got {offsets.dtype} {tuple(offsets.shape)}")
    if len(offsets) != n + 1:
        raise DataFileError(f"{files.offsets or files.features}: {len(offsets)} offsets for {n} ids "
                            f"(expected {n + 1}: item i has frames offsets[i]:offsets[i+1])")
    if n == 0:
        raise DataFileError(f"{files.captions}: the file holds no items")
    offsets = offsets.astype(np.int64)
    if offsets[0] != 0 or offsets[-1] != feats.shape[0] or (np.diff(offsets) < 0).any():
        raise DataFileError(f"{files.offsets or files.features}: offsets must start at 0, never decrease and "
                            f"end at the number of frames ({feats.shape[0]}); they run {offsets[0]}..{offsets[-1]}")
    return meta, feats, offsets


# ---- item checks ---------------------------------------------------------------------------------

def listed(ids, limit=5):
    """``a, b, c (+n more)``: the first ``limit`` ids of a list."""
    ids = [str(i) for i in ids]
    return ", ".join(ids[:limit]) + (f" (+{len(ids) - limit} more)" if len(ids) > limit else "")


def item_problems(corpus):
    """Ids of items that would poison training: non-finite features, no caption in any language,
    and {id: count} of ids that occur more than once."""
    return {
        "non_finite": [corpus.ids[i] for i, f in enumerate(corpus.features) if f.size and not np.isfinite(f).all()],
        "uncaptioned": [corpus.ids[i] for i in range(len(corpus))
                        if not any(c.strip() for lang in corpus.languages for c in corpus.captions[lang][i])],
        "repeated": {vid: n for vid, n in Counter(corpus.ids).items() if n > 1},
    }


def check_items(corpus, allow_duplicate_ids=False):
    """Refuse items that would poison training: non-finite features, no caption at all, repeated ids."""
    problems = item_problems(corpus)
    if problems["non_finite"]:
        raise DataFileError(f"{corpus.path}: NaN or infinite video features in item(s) "
                            f"{listed(problems['non_finite'])}")
    if problems["uncaptioned"]:
        raise DataFileError(f"{corpus.path}: item(s) without any caption in the languages read "
                            f"({', '.join(corpus.languages)}; config key 'languages'): "
                            f"{listed(problems['uncaptioned'])}")
    if problems["repeated"] and not allow_duplicate_ids:
        raise DataFileError(f"{corpus.path}: duplicate id(s): {listed(list(problems['repeated']))} (set config key "
                            "'data.allow_duplicate_ids' to true to average items that share an id)")
