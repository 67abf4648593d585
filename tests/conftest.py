"""Shared fixtures: a small Multi-Toy dataset and the tiny encoders, built once per test session."""
import json
from pathlib import Path

import pytest

from data_loader import toy
from utils import tiny_encoders


@pytest.fixture(scope="session")
def toy_assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy_assets")
    data = toy.generate(root / "multi_toy", seed=3, n_train=128, n_test=48)
    encoders = tiny_encoders.build(root / "encoders", tiny_encoders.train_captions(data["train"]))
    return {"train": data["train"], "test": data["test"], "encoders": encoders, "root": root}


@pytest.fixture
def write_config(tmp_path, toy_assets):
    """Write a small toy config into tmp_path and return its path; ``sections`` override the defaults."""
    def write(name="toy", **sections):
        config = {
            "stage": "translate-train",
            "data": {"train_path": str(toy_assets["train"]), "eval_path": str(toy_assets["test"]),
                     "n_video_tokens": 24, "max_words_train": 24, "max_words_eval": 24,
                     "batch_size": 16, "eval_batch_size": 20},
            "model": {"text_encoder": str(toy_assets["encoders"]["labse-tiny"]), "width": 32,
                      "projection_dim": 32, "depth": 1, "heads": 2},
            "optimizer": {"lr": 2e-3},
            "trainer": {"epochs": 2, "save_dir": str(tmp_path / "runs"), "log_every": 1},
        }
        for key, value in sections.items():
            if isinstance(value, dict):
                config.setdefault(key, {}).update(value)
            else:
                config[key] = value
        path = Path(tmp_path) / f"{name}.json"
        path.write_text(json.dumps(config))
        return path
    return write


def sacred_scalars(run_dir, name):
    """Values of one scalar series that Sacred recorded for a run."""
    return json.loads((Path(run_dir) / "metrics.json").read_text())[name]["values"]
