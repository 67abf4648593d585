"""Re-rank saved similarity matrices offline: raw and re-ranked tables side by side.

    python test.py -r runs/toy/translate_train/1/latest.pt --rerank qbnorm --save-sims sims/
    python -m utils.rerank sims/ --rerank dsl,qbnorm --out sims/rerank.json

Reads what ``test.py --save-sims`` writes: <lang>.npy (queries x videos) with <lang>.json (the
video id of each row and column), and for QB-Norm <lang>.querybank.npy (querybank captions x the
same videos, written when test.py ran with QB-Norm). The tie rule and the R@K denominator are
options, as ``eval.tie_break`` and ``eval.total_queries`` are in a config.
"""
import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from model.metric import TIE_BREAKS, MatrixScores, format_side_by_side, rank_scores, with_mean_rows
from model.rerank import RERANKERS, build_rerankers
from common.errors import UserError, run_command


class SimsError(UserError, ValueError):
    """A saved similarity file is missing or does not match its neighbours; the message names it."""


def _positive(text):
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


def read_saved(folder, querybank):
    """{lang: (MatrixScores, querybank similarities or None, querybank description or None)}."""
    folder = Path(folder)
    matrices = sorted(p for p in folder.glob("*.npy") if not p.name.endswith(".querybank.npy"))
    if not matrices:
        raise SimsError(f"{folder}: no <lang>.npy similarity matrices (write them with test.py --save-sims)")
    saved = {}
    for path in matrices:
        lang = path.stem
        ids = json.loads(path.with_suffix(".json").read_text())
        sims = torch.from_numpy(np.load(path))
        column = {vid: j for j, vid in enumerate(ids["video_ids"])}
        if sims.shape != (len(ids["query_ids"]), len(column)):
            raise SimsError(f"{path}: shape {tuple(sims.shape)} does not match the {len(ids['query_ids'])} query and "
                            f"{len(column)} video ids of {path.with_suffix('.json')}")
        scores = MatrixScores(sims, [column[vid] for vid in ids["query_ids"]])
        bank = folder / f"{lang}.querybank.npy"
        if querybank and not bank.is_file():
            raise SimsError(f"{bank}: missing; QB-Norm needs the querybank's similarities (run test.py with "
                            "--rerank qbnorm --save-sims)")
        saved[lang] = (scores, torch.from_numpy(np.load(bank)) if querybank else None, ids.get("querybank"))
    return saved


def rerank_saved(saved, rerankers, tie_break="averaging", total_queries=None):
    """{label: summary}: the raw summary first, then each re-ranker's."""
    variants = {"raw": with_mean_rows({lang: rank_scores(s, tie_break, total_queries)
                                       for lang, (s, _, _) in saved.items()})}
    for reranker in rerankers:
        per_lang = {lang: reranker.metrics(s, bank, tie_break, total_queries) for lang, (s, bank, _) in saved.items()}
        described = next(iter(saved.values()))[2]
        label = reranker.label(described) if reranker.needs_querybank else reranker.label()
        variants[label] = with_mean_rows(per_lang)
    return variants


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("folder", help="a folder written by test.py --save-sims")
    parser.add_argument("--rerank", default=",".join(RERANKERS), help="comma-separated: dsl, qbnorm (default: both)")
    parser.add_argument("--dsl-temperature", type=_positive, default=0.01)
    parser.add_argument("--qbnorm-beta", type=_positive, default=20.0)
    parser.add_argument("--tie-break", choices=TIE_BREAKS, default="averaging")
    parser.add_argument("--total-queries", type=int, help="R@K denominator (default: the ranked queries)")
    parser.add_argument("--out", help="also write the tables' numbers to this JSON file")
    args = parser.parse_args(argv)
    return run_command(lambda: run(args))


def run(args):
    names = [m.strip() for m in args.rerank.split(",") if m.strip()]
    try:
        rerankers = build_rerankers(names, args.dsl_temperature, args.qbnorm_beta)
    except ValueError as e:
        raise SimsError(f"--rerank {args.rerank}: {e}") from None
    saved = read_saved(args.folder, querybank=any(r.needs_querybank for r in rerankers))
    variants = rerank_saved(saved, rerankers, args.tie_break, args.total_queries)
    for direction in ("t2v", "v2t"):
        print(format_side_by_side(variants, direction))
        print()
    if args.out:
        Path(args.out).write_text(json.dumps({"folder": str(args.folder), "tie_break": args.tie_break,
                                              "total_queries": args.total_queries, "metrics": variants}, indent=2))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    sys.exit(main())
