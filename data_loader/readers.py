"""Readers that turn a dataset file into a ``Corpus``: ids, frame features, captions per language.

A reader knows one on-disk layout; everything downstream (tokenization, batching,
evaluation) sees only the ``Corpus``. Readers are registered by layout name so a
config names its layout and new layouts slot in without touching the data set code.

Layouts (``data.layout``):

* ``multi-msrvtt``: the released Multi-MSRVTT and VATEX pickles (docs/reference.md §1.2).
* ``multi-youcook2``: the released multilingual YouCook2 pickles, one item per clip.
* ``rudder``: the released RUDDER pickles, a ``captions`` dict per item.
* ``safe``: this project's pickle-free layout (a JSON file of ids and captions plus one
  safetensors or .npy array of concatenated frames); see ``read_safe``, ``data_loader.corpus.safe_files``
  and docs/datasets.md.

Every pickle goes through ``load_pickle`` (a restricted unpickler). Pickle readers take an
optional ``items`` argument: the already-unpickled list, so that tools which inspect a file
(``data_loader.check``) unpickle it only once.
"""
from pathlib import Path

import numpy as np

from data_loader.corpus import ENGLISH, Corpus, is_safe_path, read_safe_raw, safe_files
from data_loader.safe_pickle import DataFileError, load_pickle


READERS = {}
# layout -> the optional reading options (keyword arguments, config keys data.<option>) its reader takes.
READER_OPTIONS = {}


# Layouts whose files hold training and evaluation captions under different keys, so that the
# split decides what is read (the other layouts read a file the same way for either split).
SPLIT_LAYOUTS = set()
# Layouts whose files are pickled lists of items, in the released data's formats (detect_layout tells them apart).
PICKLE_LAYOUTS = set()


def register_reader(name, reads_split=False, pickled=False, options=()):
    def wrap(fn):
        READERS[name] = fn
        READER_OPTIONS[name] = tuple(options)
        if reads_split:
            SPLIT_LAYOUTS.add(name)
        if pickled:
            PICKLE_LAYOUTS.add(name)
        return fn
    return wrap


def read_corpus(path, layout, feature_key, split, languages=None, missing_caption_fallback="none", items=None,
                student_english="shared"):
    """Read ``path`` with the reader registered for ``layout``; ``split`` is 'train' or 'eval';
    ``items``: the already unpickled content of a pickle layout's file (it is then not read again).

    ``languages`` (optional) keeps those languages in that order. ``missing_caption_fallback``
    (config key ``data.missing_caption_fallback``) decides what an item that lacks a language
    gets: ``"none"`` (default) leaves its caption list empty, so the item is left out of that
    language's loss and evaluation; ``"last_available"`` copies the caption of its last available
    language, which is what the reference's RUDDER loader did (parity only, see
    ``fill_missing_captions``). The fallback is applied after the language selection.
    ``student_english`` (config key ``data.student_english``, for the readers that declare it in
    ``READER_OPTIONS``): see ``read_multi_youcook2``.
    """
    if layout not in READERS:
        raise DataFileError(f"unknown data layout '{layout}'; known: {', '.join(sorted(READERS))}")
    if items is None and layout in PICKLE_LAYOUTS and is_safe_path(path):
        raise DataFileError(f"{path}: a folder or safe-layout files, but config key 'data.layout' is '{layout}', "
                            "which reads one pickle file; data written by data_loader.convert needs 'safe'")
    options = {} if items is None else {"items": items}
    if "student_english" in READER_OPTIONS[layout]:
        options["student_english"] = student_english
    corpus = READERS[layout](path, feature_key=feature_key, split=split, **options)
    if languages:
        corpus.select_languages(languages)
    return fill_missing_captions(corpus, missing_caption_fallback)


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
    if not isinstance(data, list):
        raise DataFileError(f"{path}: expected a list of dicts (the released layout), got {type(data).__name__}")
    bad = next((i for i, x in enumerate(data) if not isinstance(x, dict)), None)
    if bad is not None:
        raise DataFileError(f"{path}: expected a list of dicts (the released layout), but item {bad} is a "
                            f"{type(data[bad]).__name__}")
    if not data:
        raise DataFileError(f"{path}: the file holds no items")
    return data


class SplitNotInFile(DataFileError):
    """The file holds no captions of the requested split (a training file read as a test file, say)."""


@register_reader("multi-msrvtt", reads_split=True, pickled=True)
def read_multi_msrvtt(path, feature_key, split, items=None):
    """Multi-MSRVTT and VATEX pickles (docs/reference.md §1.2).

    Training items hold ``caption_<lang>`` lists aligned by index; evaluation items hold one
    ``eval_caption_<lang>`` string per language. Languages are the caption keys found in the
    file; an item without a language's key has no caption in it (the released files have every
    language in every item).
    """
    data = _as_list_of_dicts(load_pickle(path) if items is None else items, path)
    prefix = "caption_" if split == "train" else "eval_caption_"
    per_item = [{k[len(prefix):]: caption_list(v, path, i, k) for k, v in item.items() if k.startswith(prefix)}
                for i, item in enumerate(data)]
    if not any(per_item):
        raise SplitNotInFile(f"{path}: no '{prefix}<lang>' keys in any item "
                             f"(is this a {'training' if split == 'train' else 'test'} file?)")
    for i, found in enumerate(per_item):
        counts = {lang: len(caps) for lang, caps in found.items() if caps}  # [] or None: no caption
        if len(set(counts.values())) > 1:
            (a, n), (b, m) = min(counts.items(), key=lambda kv: kv[1]), max(counts.items(), key=lambda kv: kv[1])
            raise DataFileError(
                f"{path}: item {data[i].get('id', i)} has {n} '{prefix}{a}' captions but {m} '{prefix}{b}' "
                "ones; captions must be aligned by index")
    unread = set()
    extras = [_plain_extras(item, unread, {"id", feature_key} |
                            {k for k in item if k.startswith(("caption_", "eval_caption_"))}) for item in data]
    return _assemble(path, data, per_item, feature_key, extras, unread)


# ---- shared helpers of the readers below ---------------------------------------------------------


def _ordered_languages(languages):
    """English first (the pivot of every stage), then the rest alphabetically."""
    languages = set(languages)
    head = [ENGLISH] if ENGLISH in languages else []
    return head + sorted(languages - set(head))


def _assemble(path, data, per_item, feature_key, extras, unread):
    """A Corpus from the items and, per item, their captions {lang: [strings]}: every language that
    some item has, English first; an item without a language gets an empty list for it."""
    languages = _ordered_languages(set().union(*per_item))
    return Corpus(path=str(path), ids=[str(item.get("id", i)) for i, item in enumerate(data)],
                  features=[_features(item, feature_key, path, i) for i, item in enumerate(data)],
                  captions={lang: [found.get(lang, []) for found in per_item] for lang in languages},
                  extras=extras, unread_fields=sorted(unread))


def json_value(value):
    """``value`` as plain JSON data (numpy scalars become numbers), or ``_DROP`` if it cannot be."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, np.generic) and value.ndim == 0 and value.dtype.kind in "biufU":
        return value.item()
    if isinstance(value, (list, tuple)):
        out = [json_value(v) for v in value]
        return _DROP if any(v is _DROP for v in out) else out
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        out = {k: json_value(v) for k, v in value.items()}
        return _DROP if any(v is _DROP for v in out.values()) else out
    return _DROP


_DROP = object()


def _plain_extras(item, unread, skip):
    """The fields of ``item`` that are not in ``skip`` and are plain JSON data; the names of the
    others (arrays: audio, say) are added to the set ``unread``."""
    out = {}
    for key, value in item.items():
        if key in skip:
            continue
        value = json_value(value)
        if value is _DROP:
            unread.add(key)
        else:
            out[key] = value
    return out


def caption_list(value, path, index, key):
    """One item's captions of one language as a list of strings; None means 'no caption'."""
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple)) and all(isinstance(c, str) for c in value):
        return list(value)
    raise DataFileError(f"{path}: item {index} field '{key}' must be a string or a list of strings, "
                        f"got {type(value).__name__}")


# ---- YouCook2 ------------------------------------------------------------------------------------

# Language codes stored under another name in a released file.
YOUCOOK2_RENAMES = {"cz": "cs"}


# The field of a multi-youcook2 item whose English the teachers read (and the student under "shared").
TEACHER_ENGLISH_FIELD = "caption"
# data.student_english: which field of a multi-youcook2 item the student's English comes from.
STUDENT_ENGLISH_FIELDS = ("shared", "caption_en")


@register_reader("multi-youcook2", pickled=True, options=("student_english",))
def read_multi_youcook2(path, feature_key, split, items=None, student_english="shared"):
    """Multilingual YouCook2 pickles (docs/reference.md §1.2): one item per pre-cut clip.

    Each item has ``id`` (kept as a string), the features under ``feature_key`` (``2d_raw``
    for CLIP, ``s3d`` for S3D), ``caption`` (the English caption, a string) and one
    ``caption_<lang>`` string per language; Czech is stored as ``caption_cz`` and exposed as
    ``cs``. Train and evaluation files are read the same way (``split`` is not used). An item
    that lacks a language gets an empty caption list for it. The reference's teachers read
    ``caption`` and its student read ``caption_en`` (docs/reference.md §1.2). ``student_english = "shared"``: one
    English caption per item, ``caption``, serves both, and a differing ``caption_en`` is kept in
    ``extras``; ``"caption_en"``: the English captions are ``caption_en`` and the teachers' ones
    (``Corpus.teacher_english``) are ``caption``, as in the reference (an item without
    ``caption_en`` reads ``caption``).
    """
    if student_english not in STUDENT_ENGLISH_FIELDS:
        raise DataFileError(f"data.student_english '{student_english}' is not one of {', '.join(STUDENT_ENGLISH_FIELDS)}")
    data = _as_list_of_dicts(load_pickle(path) if items is None else items, path)
    per_item, teacher_english = [], []
    for i, item in enumerate(data):
        found = {}
        for key, value in item.items():
            if not (isinstance(key, str) and key.startswith("caption_")):
                continue
            lang = YOUCOOK2_RENAMES.get(key[len("caption_"):], key[len("caption_"):])
            if lang in found:
                raise DataFileError(f"{path}: item {i} has captions for '{lang}' under two keys "
                                    f"(caption_{lang} and its released alias)")
            found[lang] = caption_list(value, path, i, key)
        english = item.get(TEACHER_ENGLISH_FIELD, item.get("caption_en"))
        if english is None:
            raise DataFileError(f"{path}: item {i} has no English 'caption' (is this a YouCook2 file?)")
        teacher_english.append(caption_list(english, path, i, "caption"))
        if student_english == "shared" or ENGLISH not in found:
            found[ENGLISH] = teacher_english[-1]
        per_item.append(found)
    extras, unread = [], set()
    for item in data:
        extra = _plain_extras(item, unread, {"id", feature_key, "caption"} |
                              {k for k in item if isinstance(k, str) and k.startswith("caption_")})
        if "caption_en" in item and "caption" in item and item["caption_en"] != item["caption"]:
            extra["caption_en"] = json_value(item["caption_en"])
        extras.append(extra)
    corpus = _assemble(path, data, per_item, feature_key, extras, unread)
    if student_english == "caption_en":
        corpus.teacher_english = teacher_english
    return corpus


# ---- RUDDER --------------------------------------------------------------------------------------

@register_reader("rudder", pickled=True)
def read_rudder(path, feature_key, split, items=None):
    """RUDDER pickles (docs/reference.md §1.2): ``id``, features (``2d``), ``captions`` {lang: string}.

    An item that lacks a language gets an EMPTY caption list for it, so it is left out of that
    language's training loss and evaluation (the reference duplicated another language's
    caption instead; ``data.missing_caption_fallback = "last_available"`` reproduces that).
    The order of each item's ``captions`` dict is kept in ``extras[i]["caption_languages"]``:
    the fallback needs it. Per-language audio (``audios``) is not read. ``split`` is not used.
    """
    data = _as_list_of_dicts(load_pickle(path) if items is None else items, path)
    per_item = []
    for i, item in enumerate(data):
        caps = item.get("captions")
        if not isinstance(caps, dict):
            raise DataFileError(f"{path}: item {i} has no 'captions' dict (is this a RUDDER file?)")
        per_item.append({str(lang): caption_list(value, path, i, f"captions[{lang}]")
                         for lang, value in caps.items()})
    # Every language of the file is read (ta, te and ml too, which the reference left out);
    # the RUDDER configs select the paper's en, hi, mr, kn with `languages`.
    extras, unread = [], set()
    for item, found in zip(data, per_item):
        extra = _plain_extras(item, unread, {"id", feature_key, "captions"})
        extra["caption_languages"] = [lang for lang, caps in found.items() if caps]
        extras.append(extra)
    return _assemble(path, data, per_item, feature_key, extras, unread)


# ---- the safe layout (its files: data_loader.corpus) ---------------------------------------------

@register_reader("safe")
def read_safe(path, feature_key=None, split=None, raw=None):
    """This project's safe layout (no pickle): see ``safe_files`` and docs/datasets.md.

    ``captions.json``: ``{"format": "c2kd-safe", "version": 1, "ids": [...], "feature_key": "2d",
    "captions": {lang: [[caption, ...] per item]}, "extras": [{...} per item] (optional)}``; an
    empty list means the item has no caption in that language. Features: one float array
    ``[total frames, dim]`` (all videos' frames concatenated, in item order) and int64 ``offsets``
    ``[items + 1]``. One folder (or base path) holds one split, so ``split`` is not used;
    ``feature_key`` (when given) must match the file's. ``raw``: the output of ``read_safe_raw``
    when the caller already has it.
    """
    meta, feats, offsets = read_safe_raw(path) if raw is None else raw
    where = safe_files(path).captions
    if feature_key is not None and feature_key != meta["feature_key"]:
        raise DataFileError(f"{path}: the file holds '{meta['feature_key']}' features, but config key "
                            f"'data.feature_key' is '{feature_key}'")
    n = len(meta["ids"])
    captions = {}
    for lang, per_item in meta["captions"].items():
        if not isinstance(per_item, list) or len(per_item) != n:
            raise DataFileError(f"{where}: captions['{lang}'] must be a list with one entry per item ({n}), "
                                f"got {len(per_item) if isinstance(per_item, list) else type(per_item).__name__}")
        captions[lang] = [caption_list(c, where, i, f"captions[{lang}]") for i, c in enumerate(per_item)]
    if not captions:
        raise DataFileError(f"{where}: 'captions' holds no language")
    extras = meta.get("extras") or [{} for _ in range(n)]
    if not isinstance(extras, list) or len(extras) != n or not all(isinstance(e, dict) for e in extras):
        raise DataFileError(f"{where}: 'extras' must be a list of {n} objects")
    feats = np.asarray(feats, dtype=np.float32)
    features = [feats[offsets[i]:offsets[i + 1]] for i in range(n)]
    # The file's language order, with English (the pivot language) first.
    captions = {lang: captions[lang] for lang in sorted(captions, key=lambda lang: lang != ENGLISH)}
    # A folder, or the captions file of a base path: either names something on disk.
    source = str(path) if Path(path).is_dir() else str(where)
    return Corpus(path=source, ids=[str(i) for i in meta["ids"]], features=features, captions=captions,
                  extras=extras)


# ---- missing captions ----------------------------------------------------------------------------

MISSING_CAPTION_FALLBACKS = ("none", "last_available")


def fill_missing_captions(corpus, mode="none"):
    """Give items that lack a language the caption of another language, or leave them empty.

    ``"none"``: unchanged; an empty list means "no caption", and that item is left out of the
    language's loss and evaluation. ``"last_available"`` (parity with the reference's RUDDER
    loader only): a missing language gets a copy of the captions of the item's *last* available
    language, in the order of the item's own caption dict (``extras[i]["caption_languages"]``
    when the reader recorded it, else the corpus' language order), among the corpus' languages.
    The copy is then trained and evaluated as if it were a caption in the missing language, which
    inflates that language's numbers; use it only to compare with the reference. Which language
    was copied is recorded in ``extras[i]["filled_captions"]``. The teachers' English of an item
    without English is its *first* available language (``Corpus.teacher_english``), as the
    reference's RUDDER teachers read it.
    """
    if mode not in MISSING_CAPTION_FALLBACKS:
        raise DataFileError(f"data.missing_caption_fallback '{mode}' is not one of "
                            f"{', '.join(MISSING_CAPTION_FALLBACKS)}")
    if mode == "none":
        return corpus
    languages = corpus.languages
    if len(corpus.extras) != len(corpus):
        corpus.extras = [{} for _ in range(len(corpus))]
    for i in range(len(corpus)):
        order = [lang for lang in corpus.extras[i].get("caption_languages", ()) if lang in corpus.captions]
        order += [lang for lang in languages if lang not in order]
        available = [lang for lang in order if corpus.captions[lang][i]]
        if not available:
            continue
        if ENGLISH in languages and not corpus.captions[ENGLISH][i]:
            if corpus.teacher_english is None:
                corpus.teacher_english = [list(caps) for caps in corpus.captions[ENGLISH]]
            corpus.teacher_english[i] = list(corpus.captions[available[0]][i])
        source = available[-1]
        filled = {}
        for lang in languages:
            if not corpus.captions[lang][i]:
                corpus.captions[lang][i] = list(corpus.captions[source][i])
                filled[lang] = source
        if filled:
            corpus.extras[i] = {**corpus.extras[i], "filled_captions": filled}
    return corpus


# ---- layout detection (data_loader.check, data_loader.convert) ----------------------------------

# Feature keys of the released files, in the order they are tried when none is given.
KNOWN_FEATURE_KEYS = ("2d", "2d_raw", "s3d", "3d", "2d_full")
NON_VIDEO_KEYS = ("audio",)


def detect_layout(items, path):
    """(layout, split) of an unpickled released file, from the keys of its items."""
    data = _as_list_of_dicts(items, path)
    keys = set().union(*(item.keys() for item in data[:50]))
    str_keys = {k for k in keys if isinstance(k, str)}
    if "captions" in str_keys and isinstance(data[0].get("captions"), dict):
        return "rudder", "train"
    if any(k.startswith("eval_caption_") for k in str_keys):
        return "multi-msrvtt", "eval"
    multi = sorted(k for k in str_keys if k.startswith("caption_"))
    # Multi-MSRVTT training items hold lists of captions; YouCook2 items hold one string each.
    if any(isinstance(item.get(k), (list, tuple)) for item in data[:50] for k in multi):
        return "multi-msrvtt", "train"
    if multi or "caption" in str_keys:
        return "multi-youcook2", "train"
    raise DataFileError(f"{path}: cannot tell the layout (no 'captions', 'caption', 'caption_<lang>' or "
                        "'eval_caption_<lang>' keys); pass --layout")


def detect_feature_key(items, path):
    """The video feature key of a released file: the first known key holding a 2-D array."""
    first = items[0]
    arrays = [k for k, v in first.items()
              if isinstance(v, np.ndarray) and v.ndim == 2 and k not in NON_VIDEO_KEYS]
    for key in KNOWN_FEATURE_KEYS:
        if key in arrays:
            return key
    if arrays:
        return sorted(arrays)[0]
    raise DataFileError(f"{path}: no 2-D feature array in the first item (keys: "
                        f"{', '.join(map(str, first)) or 'none'}); pass --feature-key")
