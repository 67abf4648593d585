"""C2KD's gain on a small Multi-Toy depends on its teachers: a student distilled from an English
teacher trained on the English-rich file beats one distilled from a teacher with random weights
(random similarity matrices), through train.py, the Trainer, cached teacher outputs and real tiny
encoders. A broken distillation path (targets of the wrong items, a dropped term, ...) loses it."""
import json
from pathlib import Path

import pytest
import torch

import train as train_entry
from data_loader import toy
from model.model import build_model
from parse_config import resolve
from utils import tiny_encoders
from common.checkpoint import save_checkpoint

FEATURE_DIM = 128


def small_config(data, encoder, tmp, **flat):
    return {"data.train_path": str(data["train"]), "data.eval_path": str(data["val"]),
            "data.feature_dim": FEATURE_DIM, "data.n_video_tokens": 24, "data.max_words_train": 24,
            "data.max_words_eval": 24, "data.batch_size": 32, "model.text_encoder": str(encoder),
            "model.width": 64, "model.projection_dim": 64, "model.depth": 1, "model.heads": 2,
            "optimizer.lr": 2e-3, "trainer.save_dir": str(tmp / "runs"),
            "teachers.cache_dir": str(tmp / "teacher_cache"), **flat}


def train(tmp, name, flat):
    """Train the run ``name`` with train.py; its last-epoch validation metrics."""
    nested = {}
    for key, value in flat.items():
        section, _, leaf = key.rpartition(".")
        (nested.setdefault(section, {}) if section else nested)[leaf] = value
    path = tmp / f"{name}.json"
    path.write_text(json.dumps(nested))
    assert train_entry.main(["-c", str(path), "--run-id", "0", "-d", "cpu"]) == 0
    return json.loads((tmp / "runs" / name / "0" / "run.json").read_text())["result"]


@pytest.fixture(scope="module")
def students(tmp_path_factory):
    return small_benchmark(tmp_path_factory.mktemp("distillation_gain"))


def small_benchmark(tmp):
    """Validation metrics of the teacher and of the students distilled from it and from random weights."""
    data = toy.generate(tmp / "data", seed=1, n_train=256, n_test=0, n_val=100, n_english=2048,
                        feature_dim=FEATURE_DIM)
    encoders = tiny_encoders.build(tmp / "encoders", tiny_encoders.train_captions(data["train"]),
                                   names=["labse-tiny", "xlmr-tiny"])
    teacher = small_config(data, encoders["xlmr-tiny"], tmp, stage="translate-train", languages=["en"],
                           **{"data.train_path": str(data["english"]), "model.role": "teacher",
                              "trainer.epochs": 6})
    trained = train(tmp, "teacher", teacher)
    # The same teacher with random weights: its similarity matrices carry no knowledge.
    torch.manual_seed(0)
    config = resolve(teacher)
    random_teacher = save_checkpoint({"model": build_model(config["model"], FEATURE_DIM).state_dict(),
                                      "config": config, "epoch": 0, "step": 0}, tmp / "random_teacher.pt")
    student = small_config(data, encoders["labse-tiny"], tmp, stage="c2kd", seed=0, **{
        "loss.balance": 0.2, "trainer.epochs": 8})
    return {"teacher": trained,
            "distilled": train(tmp, "distilled", {
                **student, "teachers.checkpoints": [str(tmp / "runs/teacher/0/latest.pt")]}),
            "random": train(tmp, "random", {**student, "teachers.checkpoints": [str(random_teacher)]})}


def test_distillation_from_a_trained_teacher_beats_random_teacher_similarities(students):
    r1 = {k: {m: v[f"t2v_{m}_R1"] for m in ("en", "mean_no_en") if f"t2v_{m}_R1" in v} for k, v in students.items()}
    assert r1["teacher"]["en"] >= 50, r1
    assert r1["distilled"]["mean_no_en"] - r1["random"]["mean_no_en"] >= 5, r1
