"""Evaluate a checkpoint: per-language text-to-video and video-to-text retrieval.

    python test.py -r runs/toy/translate_train/1/latest.pt
    python test.py -r model.pt --set data.eval_path=data/other_test.pkl --save-sims
The checkpoint's own config is the base; ``-c`` and ``--set`` override it (for example another
evaluation file). Prints the tables and writes metrics.json to --out (default:
<checkpoint folder>/eval/<checkpoint name>/, so each checkpoint keeps its own results), and with
--save-sims the similarity matrices to <out>/sims/ (or the folder it names).
"""
import json
import sys
from pathlib import Path

import numpy as np

from model.metric import format_table
from model.model import model_from_checkpoint
from parse_config import ConfigError, build_parser, config_from_args, flatten_config, select_device
from trainer.build import build_loaders, load_corpora
from trainer.evaluate import evaluate, flat_metrics
from utils.checkpoint import load_checkpoint
from utils.errors import run_command
from utils.experiment import check_run_id, run_experiment


def main(argv=None):
    parser = build_parser(__doc__.splitlines()[0], train=False)
    parser.add_argument("--out", help="folder for metrics.json (default: <checkpoint folder>/eval/<checkpoint name>)")
    parser.add_argument("--save-sims", metavar="DIR", nargs="?", const=True,
                        help="also write each language's similarity matrix (.npy) to DIR (default: <out>/sims)")
    args = parser.parse_args(argv)
    return run_command(lambda: run(args), args.debug)


def run(args):
    if not args.resume:
        raise ConfigError("test.py needs a checkpoint: -r CHECKPOINT")
    check_run_id(args.run_id)
    device = select_device(args.device)
    state = load_checkpoint(args.resume)
    config = config_from_args(args, flatten_config(state["config"]), args.resume)
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
    corpora = load_corpora(config, splits=("eval",))
    _, loader = build_loaders(config, corpora, tokenizer)
    summary, scores = evaluate(model, loader, corpora["eval"].languages, config["eval"], device, return_scores=True)
    for direction in ("t2v", "v2t"):
        print(format_table(summary, direction=direction))
        print()
    record = {"checkpoint": str(checkpoint), "eval_path": config["data"]["eval_path"],
              "epoch": state["epoch"], "eval": config["eval"], "metrics": summary}
    (out / "metrics.json").write_text(json.dumps(record, indent=2))
    print(f"wrote {out / 'metrics.json'}")
    if save_sims:
        write_similarities(scores, Path(save_sims))
    return {k: float(v) for k, v in flat_metrics(summary).items()}


def write_similarities(scores, folder):
    """<lang>.npy (queries x videos) and <lang>.json with the query and video ids of its rows/columns."""
    folder.mkdir(parents=True, exist_ok=True)
    for lang, s in scores.items():
        np.save(folder / f"{lang}.npy", s.sims.numpy())
        (folder / f"{lang}.json").write_text(json.dumps({"query_ids": s.query_ids, "video_ids": s.video_ids}))
    print(f"wrote similarity matrices of {len(scores)} languages to {folder}")


if __name__ == "__main__":
    sys.exit(main())
