"""Wiring shared by train.py and test.py: config -> data -> model -> teachers -> loss -> optimizer -> trainer."""
import functools

import torch

from data_loader.batch import POOL_MASK, STUDENT
from data_loader.corpus import ENGLISH
from data_loader.dataset import EnglishReading, TextInput
from data_loader.loaders import eval_loader, load_split, train_loader, train_sampler
from data_loader.safe_pickle import DataFileError
from model.loss import stage_loss
from model.model import load_tokenizer
from trainer.evaluate import check_monitor, evaluate
from trainer.teachers import CachedTeachers, OnlineTeachers, load_teacher
from trainer.trainer import Trainer, TrainerSettings, check_accumulation
from common.errors import ConfigError


def load_corpora(config, splits=("train", "eval")):
    corpora = {split: load_split(config, split) for split in splits}
    # Training needs the pivot language (every stage's main loss, the teachers' input); evaluation
    # ranks whichever languages its file has.
    train = corpora.get("train")
    if train is not None and ENGLISH not in train.languages:
        if config["languages"]:
            raise ConfigError(f"config key 'languages' must include '{ENGLISH}', the pivot language of every "
                              f"stage (it lists {', '.join(config['languages'])})")
        raise DataFileError(f"{config['data']['train_path']}: no '{ENGLISH}' captions, the pivot language of every "
                            f"stage (the file has {', '.join(train.languages)})")
    return corpora


def check_training(config, corpora, world_size=1):
    """What training refuses knowing only the config and the corpora, checked before the teachers'
    work (which may embed the whole training set)."""
    check_monitor(config["trainer"]["monitor"], corpora["eval"].languages)
    if config["model"]["pool_with_student_mask"]:
        # Training pools with the model's own mask; the student-mask quirk (docs/reference.md §2.3) is reproduced only
        # where converted reference teachers are used: evaluation, inference and distillation.
        raise ConfigError("config key 'model.pool_with_student_mask' is for evaluating and distilling from "
                          "converted reference teachers; training with it is not supported (set it to false)")
    # The sampler refuses a batch the processes cannot share; the micro-batches must share a process's part.
    sampler = train_sampler(corpora["train"], config, 0, world_size)
    check_accumulation(config["trainer"]["accumulation_steps"], sampler.local_batch)


def build_loaders(config, corpora, tokenizer, extra_inputs=(), rank=0, world_size=1):
    train = None
    english = EnglishReading.of(config)  # an English-input teacher reads English as the dataset's teachers do
    if "train" in corpora:
        train_languages = stage_loss(config["stage"]).student_languages(corpora["train"].languages)
        inputs = [TextInput(STUDENT, tokenizer, train_languages, english), *extra_inputs]
        train = train_loader(corpora["train"], inputs, config, rank, world_size)
    languages = corpora["eval"].languages
    inputs = [TextInput(STUDENT, tokenizer, languages, english)]
    if config["model"]["pool_with_student_mask"]:
        inputs.append(TextInput(POOL_MASK, load_tokenizer(config["model"]["pool_mask_tokenizer"]), languages))
    evaluation = eval_loader(corpora["eval"], inputs, config, rank, world_size)
    return train, evaluation


def build_loss(config, num_teachers=0):
    """The loss of the config's stage."""
    return stage_loss(config["stage"]).from_config(config["loss"], num_teachers)


def build_teachers(config, train_corpus, device, student_tokenizer):
    """The frozen teachers of a stage that distils, cached or online as ``teachers.mode`` says; None
    for the other stages. All checks run here, before any training step."""
    if not stage_loss(config["stage"]).distils:
        return None
    paths = config["teachers"]["checkpoints"]
    if not paths:
        raise ConfigError(f"stage '{config['stage']}' needs teachers: set config key 'teachers.checkpoints' "
                          "to a list of teacher checkpoint paths")
    teachers = [load_teacher(p, config["data"]["feature_dim"], device) for p in paths]
    if config["teachers"]["mode"] == "online":
        return OnlineTeachers(teachers, student_tokenizer)
    return CachedTeachers.build(teachers, train_corpus, config, device, student_tokenizer)


def build_optimizer(config, model, loss_fn):
    """Adam over the trainable parameters and its ExponentialLR schedule, stepped once per epoch
    (docs/reference.md §5). Learnable teacher weights of the loss train with their own learning rate."""
    groups = [{"params": [p for p in model.parameters() if p.requires_grad], "lr": config["optimizer"]["lr"]}]
    loss_params = [p for p in loss_fn.parameters() if p.requires_grad]
    if loss_params:
        groups.append({"params": loss_params, "lr": config["teachers"]["learnable_lr"]})
    optimizer = torch.optim.Adam(groups)
    return optimizer, torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=config["scheduler"]["gamma"])


def build_trainer(config, model, loss_fn, train_loader, eval_loader, device, **options):
    """The Trainer of ``config``: its optimizer and schedule, evaluation of every language of
    ``eval_loader`` after each epoch. ``options``: run_dir, log_scalar, teachers, dist (see Trainer)."""
    optimizer, scheduler = build_optimizer(config, model, loss_fn)
    evaluate_model = functools.partial(evaluate, model, eval_loader, eval_loader.dataset.languages,
                                       config["eval"], device)
    return Trainer(TrainerSettings.of(config), model, loss_fn, optimizer, scheduler, train_loader, evaluate_model,
                   device, **options)
