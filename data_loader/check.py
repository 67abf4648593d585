"""Summarise a dataset file and flag what would break or bias training.

    python -m data_loader.check data/msrvtt/clip/msrvtt_jsfusion_test_multilingual.pkl
    python -m data_loader.check data/rudder/clip/rudder_train.pkl --layout rudder --feature-key 2d
    python -m data_loader.check data/mydata/train            # a safe-layout folder

Reads any supported file (a released pickle of any layout, or a safe-layout folder / base path);
the layout, split and feature key are detected when not given. Prints the number of items and
unique ids, the feature key, dimension, stored dtype and frames per video (min / median / max),
and per language the number of captions and of items without one. Warnings (exit status 0, or 1
with --strict): items without a caption in some language, empty caption strings, videos with no
frames. Errors (exit status 2), the same that train.py and test.py refuse: a file that cannot be
read in the given layout, features holding NaN or inf, items without a caption in any language,
and duplicate ids (unless --allow-duplicate-ids, as config key 'data.allow_duplicate_ids'). A
non-zero exit prints a one-line reason on stderr.
"""
import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from data_loader.corpus import is_safe_path, item_problems, listed, read_safe_raw
from data_loader.readers import (PICKLE_LAYOUTS, READERS, SPLIT_LAYOUTS, detect_feature_key, detect_layout,
                                 read_safe)
from data_loader.safe_pickle import DataFileError, load_pickle
from common.errors import run_command

# Known evaluation quirks of released files, printed as hints: (layout, split, items) -> text.
HINTS = {
    ("multi-msrvtt", "eval", 968): "the reference scored this 968-video test file against 1000 queries "
                                   "(missing videos count as failures): set eval.total_queries = 1000",
}


@dataclass
class Loaded:
    corpus: object
    layout: str
    split: str
    feature_key: str
    stored_dtypes: list = field(default_factory=list)
    detected: list = field(default_factory=list)   # which of layout / split / feature key were detected


def load_any(path, layout=None, feature_key=None, split=None):
    """Read ``path`` in ``layout`` (detected when None); every failure is a one-line DataFileError."""
    path = Path(path)
    detected = []
    safe = is_safe_path(path)
    if not path.exists() and not safe:
        raise DataFileError(f"{path}: file not found")
    if layout == "safe" or (layout is None and safe):
        if layout is None:
            detected.append("layout")
        raw = read_safe_raw(path)
        corpus = read_safe(path, feature_key, raw=raw)
        return Loaded(corpus, "safe", split or "-", raw[0]["feature_key"], [str(raw[1].dtype)], detected)
    if layout is not None and layout not in READERS:
        raise DataFileError(f"unknown layout '{layout}'; known: {', '.join(sorted(READERS))}")
    if layout is not None and layout not in PICKLE_LAYOUTS:  # a reader registered by a user
        corpus = READERS[layout](path, feature_key=feature_key, split=split or "train")
        return Loaded(corpus, layout, split or "train", feature_key, [], detected)
    items = load_pickle(path)
    found_layout, found_split = detect_layout(items, path)
    if layout is None:
        layout, detected = found_layout, detected + ["layout"]
    if split is None:
        split = found_split if layout == found_layout else "train"
        if layout in SPLIT_LAYOUTS:
            detected.append("split")
    if feature_key is None:
        feature_key, detected = detect_feature_key(items, path), detected + ["feature key"]
    corpus = READERS[layout](path, feature_key=feature_key, split=split, items=items)
    dtypes = sorted({str(np.asarray(item[feature_key]).dtype) for item in items})
    return Loaded(corpus, layout, split, feature_key, dtypes, detected)


@dataclass
class Findings:
    lines: list = field(default_factory=list)
    warnings: list = field(default_factory=list)
    errors: list = field(default_factory=list)


def summarise(loaded, max_ids=10, allow_duplicate_ids=False):
    c = loaded.corpus
    out = Findings()
    say = out.lines.append
    tag = f" (detected: {', '.join(loaded.detected)})" if loaded.detected else ""
    say(f"file        {c.path}")
    split = f", split {loaded.split}" if loaded.layout in SPLIT_LAYOUTS else ""
    say(f"layout      {loaded.layout}{split}{tag}")
    problems = item_problems(c)
    say(f"items       {len(c)} ({len(set(c.ids))} unique ids)")
    frames = np.array([f.shape[0] for f in c.features])
    dtypes = "/".join(loaded.stored_dtypes) or "unknown"
    say(f"features    '{loaded.feature_key}': dim {c.feature_dim}, stored {dtypes}, frames per video "
        f"min {frames.min()} / median {np.median(frames):g} / max {frames.max()}")
    say(f"languages   {len(c.languages)}: {' '.join(c.languages)}")
    rows = [("lang", "captions", "items", "without", "empty strings")]
    for lang in c.languages:
        per_item = c.captions[lang]
        missing = [c.ids[i] for i, caps in enumerate(per_item) if not caps]
        blank = [c.ids[i] for i, caps in enumerate(per_item) if any(not s.strip() for s in caps)]
        rows.append((lang, str(sum(map(len, per_item))), str(len(per_item) - len(missing)),
                     str(len(missing)), str(len(blank))))
        if missing:
            out.warnings.append(f"{len(missing)} items have no '{lang}' caption (left out of that language's "
                                f"loss and evaluation): {listed(missing, max_ids)}")
        if blank:
            out.warnings.append(f"{len(blank)} items have an empty '{lang}' caption string: {listed(blank, max_ids)}")
    widths = [max(len(r[k]) for r in rows) for k in range(len(rows[0]))]
    for r in rows:
        say("  " + "  ".join([r[0].ljust(widths[0])] + [v.rjust(w) for v, w in zip(r[1:], widths[1:])]))
    no_caption = problems["uncaptioned"]
    if no_caption:
        out.errors.append(f"{len(no_caption)} items have no caption in any language: {listed(no_caption, max_ids)}")
    empty_videos = [c.ids[i] for i, n in enumerate(frames) if n == 0]
    if empty_videos:
        out.warnings.append(f"{len(empty_videos)} videos have no frames: {listed(empty_videos, max_ids)}")
    dups = problems["repeated"]
    if dups:
        shown = [f"{i} x{n}" for i, n in dups.items()]
        found = (out.warnings if allow_duplicate_ids else out.errors).append
        found(f"{len(dups)} ids occur more than once: {listed(shown, max_ids)}"
              + (" (evaluation averages items sharing an id)" if allow_duplicate_ids else
                 " (pass --allow-duplicate-ids, and set config key 'data.allow_duplicate_ids', to average them)"))
    bad = problems["non_finite"]
    if bad:
        out.errors.append(f"{len(bad)} items have NaN or inf features: {listed(bad, max_ids)}")
    # The YouCook2 reader keeps an item's caption_en in its extras only where it differs from the
    # caption it reads; the reference's student read caption_en and its teachers caption (docs/reference.md §1.2).
    other_english = [c.ids[i] for i, extra in enumerate(c.extras or []) if "caption_en" in extra]
    if other_english:
        out.warnings.append(f"{len(other_english)} items have a 'caption_en' that differs from their 'caption': "
                            "student and teachers both read 'caption' (the reference's student read "
                            "'caption_en'; config key data.student_english = caption_en does so): "
                            f"{listed(other_english, max_ids)}")
    hint = HINTS.get((loaded.layout, loaded.split, len(c)))
    if hint:
        say(f"note        {hint}")
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("path", help="a released pickle, or a safe-layout folder / base path")
    parser.add_argument("--layout", help=f"one of {', '.join(sorted(READERS))} (default: detected)")
    parser.add_argument("--feature-key", help="video feature key, e.g. 2d, 2d_raw, s3d (default: detected)")
    parser.add_argument("--split", choices=("train", "eval"), help="multi-msrvtt only (default: detected)")
    parser.add_argument("--allow-duplicate-ids", action="store_true",
                        help="ids that occur more than once are a warning (config key data.allow_duplicate_ids)")
    parser.add_argument("--strict", action="store_true", help="treat warnings as errors (exit status 1)")
    parser.add_argument("--max-ids", type=int, default=10, help="ids listed per finding (default 10)")
    args = parser.parse_args(argv)
    return run_command(lambda: check(args))


def check(args):
    found = summarise(load_any(args.path, args.layout, args.feature_key, args.split), args.max_ids,
                      args.allow_duplicate_ids)
    print("\n".join(found.lines))
    for w in found.warnings:
        print(f"warning: {w}")
    problems = found.errors + (found.warnings if args.strict else [])
    if problems:
        more = f" (and {len(problems) - 1} more finding(s) above)" if len(problems) > 1 else ""
        print(f"error: {args.path}: {problems[0]}{more}", file=sys.stderr)
        return 2 if found.errors else 1
    print("ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
