"""Evaluate a checkpoint: per-language text-to-video and video-to-text retrieval.

    python test.py -r runs/toy/translate_train/1/latest.pt
    python test.py -r model.pt --set data.eval_path=data/other_test.pkl --save-sims
    python test.py -r model.pt --rerank dsl,qbnorm
The checkpoint's own config is the base; ``-c`` and ``--set`` override it (for example another
evaluation file). Prints the tables and writes metrics.json to --out (default:
<checkpoint folder>/eval/<checkpoint name>/, so each checkpoint keeps its own results), and with
--save-sims the similarity matrices to <out>/sims/ (or the folder it names). With re-rankers
(``--rerank`` or ``eval.rerank``), each re-ranked table is printed beside the raw one and stored
beside it in metrics.json; ``python -m utils.rerank`` redoes them from --save-sims files.
"""
import json
import sys
from pathlib import Path

import numpy as np

from model.metric import format_side_by_side, format_table
from model.model import model_from_checkpoint
from parse_config import ConfigError, build_parser, config_from_args, flatten_config, select_device
from trainer.build import build_loaders, load_corpora
from trainer.evaluate import (draw_querybanks, embed_querybanks, evaluate, flat_metrics, querybank_description,
                              rerank_metrics, rerankers_from_config)
from common.checkpoint import load_checkpoint
from common.errors import run_command
from trainer.experiment import check_run_id, run_experiment


def main(argv=None):
    parser = build_parser(__doc__.splitlines()[0], train=False)
    parser.add_argument("--out", help="folder for metrics.json (default: <checkpoint folder>/eval/<checkpoint name>)")
    parser.add_argument("--save-sims", metavar="DIR", nargs="?", const=True,
                        help="also write each language's similarity matrix (.npy), and its querybank's with "
                             "QB-Norm, to DIR (default: <out>/sims)")
    parser.add_argument("--rerank", metavar="METHODS",
                        help="comma-separated re-rankers reported beside the raw scores: dsl, qbnorm "
                             "(sets eval.rerank; 'none' for none)")
    args = parser.parse_args(argv)
    return run_command(lambda: run(args), args.debug)


def run(args):
    if not args.resume:
        raise ConfigError("test.py needs a checkpoint: -r CHECKPOINT")
    check_run_id(args.run_id)
    if args.rerank is not None:
        methods = [m.strip() for m in args.rerank.split(",") if m.strip() and m.strip() != "none"]
        args.set.append(f"eval.rerank={json.dumps(methods)}")
    device = select_device(args.device)
    state = load_checkpoint(args.resume)
    config = config_from_args(args, flatten_config(state["config"]), args.resume)
    rerankers_from_config(config["eval"])  # a wrong re-ranker fails before a run folder is made
    out = Path(args.out) if args.out else Path(args.resume).parent / "eval" / Path(args.resume).stem
    save_sims = out / "sims" if args.save_sims is True else args.save_sims
    run_root = Path(config["trainer"]["save_dir"]) / config["name"] / "test_runs"
    model, tokenizer = model_from_checkpoint(config, state, args.resume)  # a misfit refused before any record
    run_experiment("test", config,
                   lambda cfg, run: test(cfg, run, state, args.resume, model.to(device), tokenizer, device, out,
                                         save_sims),
                   run_root, run_id=args.run_id, mongo=args.mongo, neptune=args.neptune)


def test(config, run, state, checkpoint, model, tokenizer, device, out, save_sims=None):
    for folder in (out, save_sims):  # an unwritable output fails now, not after the evaluation
        if folder:
            Path(folder).mkdir(parents=True, exist_ok=True)
    rerankers = rerankers_from_config(config["eval"])
    querybank = any(r.needs_querybank for r in rerankers)
    corpora = load_corpora(config, splits=("train", "eval") if querybank else ("eval",))
    _, loader = build_loaders(config, {"eval": corpora["eval"]}, tokenizer)
    languages = corpora["eval"].languages
    summary, scores = evaluate(model, loader, languages, config["eval"], device, return_scores=True)
    banks = None
    if querybank:
        drawn = draw_querybanks(corpora["train"], languages, config["eval"], config["seed"])
        banks = embed_querybanks(model, tokenizer, drawn, config)
    reranked = rerank_metrics(scores, rerankers, config["eval"], banks, device)
    variants = {"raw": summary, **{r["label"]: r["metrics"] for r in reranked.values()}}
    for direction in ("t2v", "v2t"):
        print(format_side_by_side(variants, direction) if reranked else format_table(summary, direction=direction))
        print()
    record = {"checkpoint": str(checkpoint), "eval_path": config["data"]["eval_path"],
              "epoch": state["epoch"], "eval": config["eval"], "metrics": summary, "reranked": reranked}
    (out / "metrics.json").write_text(json.dumps(record, indent=2))
    print(f"wrote {out / 'metrics.json'}")
    if save_sims:
        bank_sims = {lang: banks[lang] @ s.videos.t() for lang, s in scores.items()} if banks else None
        write_similarities(scores, Path(save_sims), bank_sims,
                           querybank_description(config["eval"], banks) if banks else None)
    flat = flat_metrics(summary)
    for name, r in reranked.items():
        flat.update({f"{name}/{key}": value for key, value in flat_metrics(r["metrics"]).items()})
    return {k: float(v) for k, v in flat.items()}


def write_similarities(scores, folder, bank_sims=None, bank_description=None):
    """<lang>.npy (queries x videos) and <lang>.json with the query and video ids of its rows and
    columns; with a querybank also <lang>.querybank.npy (bank captions x the same videos)."""
    folder.mkdir(parents=True, exist_ok=True)
    for lang, s in scores.items():
        np.save(folder / f"{lang}.npy", s.sims.numpy())
        ids = {"query_ids": s.query_ids, "video_ids": s.video_ids}
        if bank_sims is not None:
            np.save(folder / f"{lang}.querybank.npy", bank_sims[lang].numpy())
            ids["querybank"] = bank_description
        (folder / f"{lang}.json").write_text(json.dumps(ids))
    print(f"wrote similarity matrices of {len(scores)} languages to {folder}")


if __name__ == "__main__":
    sys.exit(main())
