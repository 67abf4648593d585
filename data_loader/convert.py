"""Convert a dataset file into the safe layout (no pickle needed to read it back).

    python -m data_loader.convert data/msrvtt/clip/msrvtt_train_multilingual.pkl data/msrvtt_safe/clip/train \\
        --layout multi-msrvtt --feature-key 2d --split train

Reads IN with the reader of its layout (detected when --layout is not given; every pickle goes
through the restricted unpickler) and writes OUT_DIR/captions.json and OUT_DIR/features.safetensors
(or, with --format npy, OUT_DIR/features.npy and OUT_DIR/offsets.npy). The written folder is then
read back and compared with the source, so reading it with ``data.layout = "safe"`` gives the same
ids, features, captions per language and extras. Fields of the released items that are not plain
data (audio arrays) are not carried over; the script says which.
"""
import argparse
import json
import sys
from pathlib import Path

import numpy as np

from data_loader.check import load_any
from data_loader.corpus import SAFE_FORMAT, SAFE_VERSION, SafeFiles
from data_loader.readers import READERS, _DROP, json_value, read_safe
from data_loader.safe_pickle import DataFileError
from common.errors import run_command
from common.files import atomic_write


def write_safe(corpus, out, feature_key, fmt="safetensors", dtype="float32", overwrite=False, source=None):
    """Write ``corpus`` as a safe-layout folder ``out``; returns (SafeFiles, names of the fields not
    written: extras that are not plain data, and the source's ``unread_fields``).

    Usable from Python to bring your own data: build a ``Corpus`` (ids, per-item float arrays
    [frames, dim], captions {lang: [[caption, ...] per item]}) and call this.
    """
    out = Path(out)
    if fmt not in ("safetensors", "npy"):
        raise ValueError(f"fmt must be safetensors or npy, got {fmt!r}")
    files = (SafeFiles(out / "captions.json", out / "features.safetensors") if fmt == "safetensors"
             else SafeFiles(out / "captions.json", out / "features.npy", out / "offsets.npy"))
    existing = [p for p in (out / "captions.json", out / "features.safetensors", out / "features.npy",
                            out / "offsets.npy") if p.exists()]
    if existing and not overwrite:
        raise DataFileError(f"{out}: already holds {existing[0].name}; pass --force to overwrite")
    dims = {f.shape[1] for f in corpus.features}
    if len(dims) != 1:
        raise DataFileError(f"{corpus.path}: items have different feature dimensions {sorted(dims)}")
    feats = np.concatenate(corpus.features, axis=0).astype(np.dtype(dtype), copy=False)
    if dtype == "float16" and not np.isfinite(feats).all() and all(np.isfinite(f).all() for f in corpus.features):
        raise DataFileError(f"{corpus.path}: some features overflow float16; keep --dtype float32")
    offsets = np.concatenate([[0], np.cumsum([f.shape[0] for f in corpus.features])]).astype(np.int64)

    dropped, extras = set(corpus.unread_fields), []
    for extra in corpus.extras:
        kept = {}
        for key, value in extra.items():
            value = json_value(value)
            if value is _DROP:
                dropped.add(key)
            else:
                kept[key] = value
        extras.append(kept)
    meta = {"format": SAFE_FORMAT, "version": SAFE_VERSION, "ids": list(corpus.ids),
            "feature_key": feature_key, "captions": corpus.captions}
    if any(extras):
        meta["extras"] = extras
    if source:
        meta["source"] = source

    out.mkdir(parents=True, exist_ok=True)
    for stale in existing:
        stale.unlink()
    if fmt == "safetensors":
        from safetensors.numpy import save
        data = save({"features": np.ascontiguousarray(feats), "offsets": offsets})
        atomic_write(files.features, lambda f: f.write(data))
    else:
        atomic_write(files.features, lambda f: np.save(f, feats, allow_pickle=False))
        atomic_write(files.offsets, lambda f: np.save(f, offsets, allow_pickle=False))
    # captions.json last: a folder without it is not mistaken for a complete split.
    atomic_write(files.captions, lambda f: f.write(json.dumps(meta, ensure_ascii=False).encode("utf-8")))
    return files, sorted(dropped)


def same_corpus(a, b, atol=0.0):
    """The first difference between two corpora as a short string, or None."""
    if a.ids != b.ids:
        return "ids differ"
    if a.languages != b.languages:
        return f"languages differ ({a.languages} vs {b.languages})"
    for lang in a.languages:
        if a.captions[lang] != b.captions[lang]:
            i = next(i for i, (x, y) in enumerate(zip(a.captions[lang], b.captions[lang])) if x != y)
            return f"'{lang}' captions of item {a.ids[i]} differ"
    for i, (x, y) in enumerate(zip(a.features, b.features)):
        if x.shape != y.shape or not np.allclose(x, y, rtol=0, atol=atol, equal_nan=True):
            return f"features of item {a.ids[i]} differ"
    for i, (x, y) in enumerate(zip(a.extras or [{}] * len(a), b.extras or [{}] * len(b))):
        plain = {k: json_value(v) for k, v in x.items()}
        if {k: v for k, v in plain.items() if v is not _DROP} != y:
            return f"extra fields of item {a.ids[i]} differ"
    return None


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("input", help="a released pickle (or a safe-layout folder)")
    parser.add_argument("out_dir", help="folder to write captions.json and the features into")
    parser.add_argument("--layout", help=f"layout of IN: {', '.join(sorted(READERS))} (default: detected)")
    parser.add_argument("--feature-key", help="video feature key of IN, e.g. 2d, 2d_raw, s3d (default: detected)")
    parser.add_argument("--split", choices=("train", "eval"),
                        help="which captions of a multi-msrvtt file (default: detected)")
    parser.add_argument("--format", choices=("safetensors", "npy"), default="safetensors",
                        help="features file: one .safetensors (default) or features.npy + offsets.npy")
    parser.add_argument("--dtype", choices=("float32", "float16"), default="float32",
                        help="stored feature dtype; readers always hand out float32 (default float32)")
    parser.add_argument("--force", action="store_true", help="overwrite an existing converted folder")
    parser.add_argument("--no-verify", action="store_true", help="skip reading the result back")
    args = parser.parse_args(argv)
    return run_command(lambda: convert(args))


def convert(args):
    loaded = load_any(args.input, args.layout, args.feature_key, args.split)
    corpus = loaded.corpus
    source = {"path": str(args.input), "layout": loaded.layout, "split": loaded.split}
    _, dropped = write_safe(corpus, args.out_dir, loaded.feature_key, args.format, args.dtype,
                            overwrite=args.force, source=source)
    if not args.no_verify:
        back = read_safe(args.out_dir, loaded.feature_key)
        diff = same_corpus(corpus, back, atol=0.0 if args.dtype == "float32" else 1e-2)
        if diff:
            raise DataFileError(f"{args.out_dir}: reading the converted folder back failed: {diff}")
    frames = sum(f.shape[0] for f in corpus.features)
    print(f"wrote {args.out_dir}: {len(corpus)} items, {frames} frames of '{loaded.feature_key}' "
          f"(dim {corpus.feature_dim}, {args.dtype}), languages {' '.join(corpus.languages)}")
    if dropped:
        print(f"not carried over (not plain data): {', '.join(dropped)}")
    print(f'in a config: "data": {{"layout": "safe", "train_path" (or "eval_path"): "{args.out_dir}", '
          f'"feature_key": "{loaded.feature_key}", "feature_dim": {corpus.feature_dim}}}')


if __name__ == "__main__":
    sys.exit(main())
