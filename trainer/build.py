"""Wiring shared by train.py and test.py: config -> data -> model -> loss -> optimizer -> trainer."""
import functools

import torch

from data_loader.batch import POOL_MASK, STUDENT
from data_loader.corpus import ENGLISH
from data_loader.dataset import EnglishReading, TextInput
from data_loader.loaders import eval_loader, load_split, train_loader
from data_loader.safe_pickle import DataFileError
from model.loss import RetrievalLoss
from model.model import load_tokenizer
from trainer.evaluate import evaluate
from trainer.trainer import Trainer, TrainerSettings
from utils.errors import ConfigError


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


def student_languages(config, corpus):
    """Zero-shot training reads English only; every other stage reads all languages."""
    return [ENGLISH] if config["stage"] == "zero-shot" else corpus.languages


def build_loaders(config, corpora, tokenizer, extra_inputs=(), rank=0, world_size=1):
    train = None
    english = EnglishReading.of(config)  # an English-input teacher reads English as the dataset's teachers do
    if "train" in corpora and config["model"]["pool_with_student_mask"]:
        # Training pools with the model's own mask; the student-mask quirk (§2.3) is reproduced only
        # where converted reference teachers are used: evaluation, inference and distillation.
        raise ConfigError("config key 'model.pool_with_student_mask' is for evaluating and distilling from "
                          "converted reference teachers; training with it is not supported (set it to false)")
    if "train" in corpora:
        inputs = [TextInput(STUDENT, tokenizer, student_languages(config, corpora["train"]), english),
                  *extra_inputs]
        train = train_loader(corpora["train"], inputs, config, rank, world_size)
    languages = corpora["eval"].languages
    inputs = [TextInput(STUDENT, tokenizer, languages, english)]
    if config["model"]["pool_with_student_mask"]:
        inputs.append(TextInput(POOL_MASK, load_tokenizer(config["model"]["pool_mask_tokenizer"]), languages))
    evaluation = eval_loader(corpora["eval"], inputs, config, rank, world_size)
    return train, evaluation


def build_loss(config, num_teachers=0):
    loss = config["loss"]
    return RetrievalLoss(config["stage"], loss["temperature"], balance=loss["balance"],
                         distill_temp=loss["distill_temp"], teacher_pool=loss["teacher_pool"],
                         teachtext=loss["teachtext"], num_teachers=num_teachers)


def build_optimizer(config, model, loss_fn):
    """Adam over the trainable parameters and its ExponentialLR schedule, stepped once per epoch (§5).
    Learnable teacher weights of the loss train with their own learning rate."""
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
