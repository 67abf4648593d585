"""Train a multilingual text-video retrieval model.

    python train.py -c configs/toy/translate_train.json
    python train.py -c configs/msrvtt/clip/c2kd.json --epochs 20 --lr 1e-4
    python train.py -r runs/toy/translate_train/1/latest.pt          # resume exactly
A run that did not finish, resumed from its folder's latest.pt, continues in that folder under its
own run id; any other resume is a new run (see trainer.experiment.continued_run_id). The same
command can be repeated: with --run-id naming a run of the same config, an unfinished run resumes in
place and a finished one is reused; a run of another config is an error (trainer.experiment.existing_run).
"""
import sys
from pathlib import Path

from model.model import model_from_config
from parse_config import (ConfigError, build_parser, config_from_args, flatten_config, select_device,
                          upgrade_saved_config)
from trainer.build import build_loaders, build_loss, build_teachers, build_trainer, check_training, load_corpora
from trainer.evaluate import flat_metrics
from trainer.state import seed_everything, seed_rank
from trainer.trainer import TrainingInterrupted, check_resumable
from common.checkpoint import checkpoint_header
from common.distributed import close_distributed, init_distributed, on_main
from common.errors import run_command
from trainer.experiment import (RESUMABLE, check_run_id, continued_run_id, existing_run, run_dir, run_experiment,
                              run_root_of)


def main(argv=None):
    args = build_parser(__doc__.splitlines()[0], train=True).parse_args(argv)
    try:
        return run_command(lambda: run(args), args.debug)
    except TrainingInterrupted as e:  # a checkpoint was written; the message says how to resume
        print(e, file=sys.stderr)
        return 128 + e.signum


def run(args):
    dist, device = init_distributed(select_device(args.device))
    try:
        train_or_reuse(args, dist, device)
    except BaseException:
        close_distributed(synchronize=False)  # every rank raises (see on_main): none is left waiting
        raise
    close_distributed()


def train_or_reuse(args, dist, device):
    check_run_id(args.run_id)
    resume = args.resume
    resumed = checkpoint_header(resume) if resume else None
    config = config_from_args(args, flatten_config(resumed["config"]) if resumed else None, resume)
    run_root = Path(config["trainer"]["save_dir"]) / config["name"]
    if resumed and run_root_of(resume) and not config_moved(resumed["config"], config):
        run_root = run_root_of(resume)  # the run's folder as it is now, also when moved or copied
    if args.run_id is not None and not resume:  # the same command again: reuse or resume its run
        folder = run_root / args.run_id
        found = on_main(lambda: existing_run(folder, config))
        if found == "finished":
            if dist.is_main:
                print(f"{folder}: finished with this config, nothing to train (remove the folder to train it again)")
            return
        if found == "resume":  # the trainer loads it; its config is this one (existing_run)
            resume = folder / RESUMABLE
    if resumed:
        check_resumable(resumed["config"], config, resume)
    if resumed and resumed.get("epoch", 0) >= config["trainer"]["epochs"]:
        raise ConfigError(f"{resume}: has already trained {resumed['epoch']} of config key 'trainer.epochs' = "
                          f"{config['trainer']['epochs']} epochs; pass --epochs N with N > {resumed['epoch']} "
                          "to train further")
    continued = continued_run_id(resume, run_root, args.run_id) if resume else None
    if resumed and resumed.get("epoch", 0) > 0 and not continued and dist.is_main:
        print(f"{resume}: training on from epoch {resumed.get('epoch', 0)} to {config['trainer']['epochs']} in a new "
              f"run folder under {run_root} (the checkpoint's run stays as it is)")
    run_experiment("train", config, lambda cfg, run: train(cfg, run, device, dist, resume),
                   run_root, run_id=continued or args.run_id, mongo=args.mongo, neptune=args.neptune,
                   continue_run=continued is not None)


def config_moved(saved, config):
    """Whether the command line places the run elsewhere than the checkpoint's config did."""
    saved = upgrade_saved_config(saved)
    return (saved["trainer"]["save_dir"], saved["name"]) != (config["trainer"]["save_dir"], config["name"])


def train(config, run, device, dist, resume=None):
    seed_everything(config["seed"])
    corpora = load_corpora(config)
    check_training(config, corpora, dist.world_size)  # before the teachers' work
    # The student before the teachers: its initial weights then follow from the seed alone, so
    # every stage starts from the same student at the same seed.
    model, tokenizer = model_from_config(config, pretrained_text=resume is None)
    teachers = build_teachers(config, corpora["train"], device, tokenizer)
    train_loader, eval_loader = build_loaders(config, corpora, tokenizer,
                                              extra_inputs=teachers.text_inputs if teachers else (),
                                              rank=dist.rank, world_size=dist.world_size)
    loss = build_loss(config, num_teachers=len(teachers) if teachers else 0)
    model.to(device)
    loss.to(device)
    folder = run_dir(run) if dist.is_main else None
    trainer = build_trainer(config, model, loss, train_loader, eval_loader, device, run_dir=folder,
                            log_scalar=run.log_scalar, teachers=teachers, dist=dist)
    seed_rank(config["seed"], dist.rank)  # after the model is built: every rank starts from the same weights
    if resume:
        trainer.resume(resume)
    trainer.print(f"run folder: {folder}")
    summary = trainer.fit()
    return {k: float(v) for k, v in flat_metrics(summary).items()} if summary else {}


if __name__ == "__main__":
    sys.exit(main())
