"""Shared fixtures: a small Multi-Toy dataset and the tiny encoders, built once per test session, and a
checkpoint trained on the full Multi-Toy for the inference tests."""
import json
from pathlib import Path

import pytest
import torch

from data_loader import toy
from model.model import build_model
from parse_config import resolve
from utils import tiny_encoders
from common.checkpoint import load_checkpoint, save_checkpoint


ROOT = Path(__file__).resolve().parents[1]
DEMO_EPOCHS = 5  # about 3 s per epoch on a free CPU; enough for the rates the inference tests assert


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """A translate-train checkpoint on the full Multi-Toy (1000 training videos), in a tmp dir, with
    its retriever and the index of the Multi-Toy test set."""
    import train as train_entry
    from utils.inference import Retriever, read_videos
    assets = tiny_encoders.ensure_toy_assets(ROOT / "cache")
    runs = tmp_path_factory.mktemp("demo_runs")
    code = train_entry.main([
        "-c", str(ROOT / "configs/toy/translate_train.json"), "--run-id", "demo", "-d", "cpu",
        "--epochs", str(DEMO_EPOCHS), "--set", f"trainer.save_dir={runs}",
        "--set", f"data.train_path={assets['train']}", "--set", f"data.eval_path={assets['test']}",
        "--set", f"model.text_encoder={assets['encoders']['labse-tiny']}"])
    assert code == 0
    checkpoint = runs / "translate_train" / "demo" / "latest.pt"
    retriever = Retriever.from_checkpoint(checkpoint)
    corpus = read_videos(assets["test"], "multi-msrvtt", "2d")
    index = retriever.build_index(corpus.ids, corpus.features, progress=False)
    return {"checkpoint": checkpoint, "retriever": retriever, "corpus": corpus, "index": index,
            "test_file": assets["test"]}


@pytest.fixture(scope="session")
def toy_assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy_assets")
    data = toy.generate(root / "multi_toy", seed=3, n_train=128, n_test=48)
    encoders = tiny_encoders.build(root / "encoders", tiny_encoders.train_captions(data["train"]))
    return {"train": data["train"], "test": data["test"], "encoders": encoders, "root": root}


def toy_config(toy_assets, tmp, stage="translate-train", teachers=(), **flat):
    """A resolved config for a tiny model on the small Multi-Toy (batch 16, runs under ``tmp``);
    ``flat`` overrides dotted keys, e.g. ``**{"trainer.epochs": 3}``."""
    base = {
        "stage": stage,
        "data.train_path": str(toy_assets["train"]), "data.eval_path": str(toy_assets["test"]),
        "data.n_video_tokens": 24, "data.max_words_train": 24, "data.max_words_eval": 24,
        "data.batch_size": 16,
        "model.text_encoder": str(toy_assets["encoders"]["labse-tiny"]), "model.width": 32,
        "model.projection_dim": 32, "model.depth": 1, "model.heads": 2,
        "optimizer.lr": 2e-3,
        "trainer.epochs": 2, "trainer.save_dir": str(Path(tmp) / "runs"), "trainer.log_every": 1,
        "teachers.checkpoints": list(teachers), "teachers.cache_dir": str(Path(tmp) / "teacher_cache"),
        "loss.teacher_pool": "mean", "loss.balance": 0.3,
    }
    return resolve({**base, **flat})


def write_json_config(tmp, name, config):
    """``config`` as ``tmp/<name>.json``; the run name comes from the file name."""
    config = {k: v for k, v in config.items() if k != "name"}
    path = Path(tmp) / f"{name}.json"
    path.write_text(json.dumps(config))
    return path


def untrained_teachers(toy_assets, tmp):
    """Teacher checkpoints with random weights (XLM-R- and DistilBERT-tiny): enough to compare losses."""
    paths = []
    for i, encoder in enumerate(("xlmr-tiny", "distiluse-tiny")):
        config = toy_config(toy_assets, tmp, **{"model.text_encoder": str(toy_assets["encoders"][encoder])})
        torch.manual_seed(100 + i)
        model = build_model(config["model"], config["data"]["feature_dim"])
        paths.append(str(save_checkpoint({"model": model.state_dict(), "config": config, "epoch": 0, "step": 0},
                                         Path(tmp) / f"teacher{i}.pt")))
    return paths


def sacred_scalars(run_dir, name):
    """Values of one scalar series that Sacred recorded for a run."""
    return json.loads((Path(run_dir) / "metrics.json").read_text())[name]["values"]


def assert_same_weights(a, b):
    """Two checkpoint files hold bit-identical model weights."""
    a, b = load_checkpoint(a)["model"], load_checkpoint(b)["model"]
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def make_trainer(config, info=None):
    """A Trainer of a fresh student (seed 0) on the CPU and the first training batch of epoch 0."""
    from trainer.build import build_loaders, build_loss, build_teachers, build_trainer, load_corpora
    from model.model import model_from_config
    from common.distributed import DistInfo
    info = info or DistInfo()
    torch.manual_seed(0)
    device = torch.device("cpu")
    corpora = load_corpora(config)
    model, tokenizer = model_from_config(config)
    teachers = build_teachers(config, corpora["train"], device, tokenizer)
    train_loader, eval_loader = build_loaders(config, corpora, tokenizer,
                                              extra_inputs=teachers.text_inputs if teachers else (),
                                              rank=info.rank, world_size=info.world_size)
    loss_fn = build_loss(config, num_teachers=len(teachers) if teachers else 0)
    trainer = build_trainer(config, model, loss_fn, train_loader, eval_loader, device, teachers=teachers, dist=info)
    train_loader.set_epoch(0)
    return trainer, next(iter(train_loader))


@pytest.fixture
def one_thread():
    """For small networks one thread is fastest: with two on a busy machine, S3D's 3D convolutions
    ran 50 times slower (threads waiting on each other)."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)
