"""Training rules: the loss's row masks, learnable teacher weights, the learning-rate decay and what
each logged step records, best.pt, and checkpoints that load without running code."""
import os
import pickle

import numpy as np
import pytest
import torch

from model.loss import RowMasks
from tests.conftest import make_trainer, toy_config, untrained_teachers, write_json_config
from common.checkpoint import FORMAT, VERSION, CheckpointError, load_checkpoint

LANGUAGES = ["en", "de", "fr"]

# Which items of the variant training file lack what, by item index modulo 8.
NO_DE, NO_FR, NO_EN, NO_FRAMES, NO_EN_NO_DE = 1, 2, 3, 4, 5


@pytest.fixture(scope="module")
def teachers(toy_assets, tmp_path_factory):
    return untrained_teachers(toy_assets, tmp_path_factory.mktemp("rules_teachers"))


@pytest.fixture(scope="module")
def gappy_train(toy_assets, tmp_path_factory):
    """The toy training file with gaps: some items lack German, French or English captions (or
    English and German; captions are aligned by index, so a missing language is a missing key), some
    have no video frames at all."""
    with open(toy_assets["train"], "rb") as f:
        items = pickle.load(f)
    for i, item in enumerate(items):
        kind = i % 8
        if kind in (NO_DE, NO_EN_NO_DE):
            del item["caption_de"]
        if kind == NO_FR:
            del item["caption_fr"]
        if kind in (NO_EN, NO_EN_NO_DE):
            del item["caption_en"]
        if kind == NO_FRAMES:
            item["2d"] = np.zeros((0, item["2d"].shape[1]), dtype=np.float32)
    path = tmp_path_factory.mktemp("rules_data") / "gappy_train.pkl"
    path.write_bytes(pickle.dumps(items, protocol=4))
    return path


# ---- 1. row masks of the loss ----------------------------------------------------------------------

def named_masks(rows, expected):
    """(name, mask of ``rows``, mask of ``expected``) for each mask of two RowMasks of one layout."""
    return [*((lang, rows.captions[lang], keep) for lang, keep in expected.captions.items()),
            ("main", rows.main, expected.main), ("teacher", rows.teacher, expected.teacher)]


def test_row_masks_leave_out_missing_captions_teacherless_items_and_empty_videos(
        toy_assets, tmp_path, teachers, gappy_train):
    config = toy_config(toy_assets, tmp_path, "c2kd", teachers, **{
        "data.train_path": str(gappy_train), "languages": LANGUAGES, "loss.teacher_pool": "mean"})
    trainer, _ = make_trainer(config)
    corpus = trainer.train_loader.dataset.corpus
    assert corpus.ids == [f"toy{i:05d}" for i in range(128)]  # file order: dataset index i is item i
    # A batch with items of every kind, so that every mask below has a left-out row.
    batch = next(b for b in trainer.train_loader
                 if {NO_DE, NO_FR, NO_EN, NO_FRAMES, NO_EN_NO_DE} <= {i % 8 for i in b.index.tolist()})
    kinds = [i % 8 for i in batch.index.tolist()]

    has_en = [k not in (NO_EN, NO_EN_NO_DE) for k in kinds]
    expected = RowMasks({"en": has_en, "de": [k not in (NO_DE, NO_EN_NO_DE) for k in kinds],
                         "fr": [k != NO_FR for k in kinds]},
                        main=[e and k != NO_FRAMES for e, k in zip(has_en, kinds)], teacher=has_en)
    rows = trainer._rows(batch)
    assert sorted(rows.captions) == sorted(expected.captions)
    for name, mask, keep in named_masks(rows, expected):
        assert mask.dtype == torch.bool and mask.tolist() == keep, name

    # A training step's loss is the loss over exactly those rows (no dropout, so both see the same
    # embeddings; the loss is computed before the optimizer step).
    trainer.model.eval()
    masks = expected.map(torch.tensor)
    with torch.no_grad():
        video, text = trainer.model(*trainer._inputs(batch))
        sims = trainer.teachers.similarities(batch)
        by_hand, terms = trainer.loss_fn(text, video, teacher_sims=sims, rows=masks)
        # Each mask matters: keeping any one of them whole changes the loss.
        for name, mask, _ in named_masks(masks, masks):
            whole = masks.map(lambda m: None if m is mask else m)
            other, _ = trainer.loss_fn(text, video, teacher_sims=sims, rows=whole)
            assert not torch.isclose(other, by_hand, rtol=1e-4), name
    assert torch.isfinite(by_hand)
    loss, step_terms = trainer.training_step(batch)
    assert loss.item() == pytest.approx(by_hand.item(), rel=1e-5)
    assert sorted(step_terms) == sorted(terms)
    for name, value in terms.items():
        assert step_terms[name].item() == pytest.approx(value.item(), rel=1e-5, abs=1e-6), name


def test_a_mask_that_keeps_every_row_is_left_out_in_one_process(toy_assets, tmp_path):
    """On the complete toy file every item has every language and frames: the loss takes its plain path."""
    trainer, batch = make_trainer(toy_config(toy_assets, tmp_path, "translate-train", languages=LANGUAGES))
    rows = trainer._rows(batch)
    assert (rows.captions, rows.main, rows.teacher) == ({}, None, None)
    batch.has_caption["de"][[0, 5]] = False
    batch.video_mask[3] = False
    rows = trainer._rows(batch)
    assert list(rows.captions) == ["de"] and rows.teacher is None
    assert torch.nonzero(~rows.captions["de"]).flatten().tolist() == [0, 5]
    assert torch.nonzero(~rows.main).flatten().tolist() == [3]


# ---- 2. learnable teacher weights ------------------------------------------------------------------

def test_learnable_teacher_weights_train_with_their_own_learning_rate(toy_assets, tmp_path, teachers):
    lr, learnable_lr = 2e-3, 0.05
    config = toy_config(toy_assets, tmp_path, "c2kd", teachers, **{
        "languages": ["en", "de"], "loss.teacher_pool": "learnable",
        "optimizer.lr": lr, "teachers.learnable_lr": learnable_lr})
    trainer, batch = make_trainer(config)
    logits = trainer.loss_fn.teacher_logits
    groups = trainer.optimizer.param_groups
    assert len(groups) == 2
    assert groups[0]["lr"] == lr and groups[1]["lr"] == learnable_lr
    assert len(groups[1]["params"]) == 1 and groups[1]["params"][0] is logits
    assert not any(p is logits for p in groups[0]["params"])
    assert logits.tolist() == pytest.approx([0.33, 0.33])

    trainer.training_step(batch)
    # Adam's first step moves each weight by its learning rate, against the sign of its gradient;
    # the softmax weights' two gradients are opposite, so one goes up and the other down.
    delta = sorted((logits.detach() - 0.33).tolist())
    assert delta == pytest.approx([-learnable_lr, learnable_lr], rel=1e-3)
    weights = torch.softmax(logits.detach(), 0)
    assert weights.sum().item() == pytest.approx(1.0) and abs(weights[0] - weights[1]) > 0.04


# ---- 3. learning-rate decay per epoch --------------------------------------------------------------

def short_run(toy_assets, tmp_path, summaries=None, **flat):
    """A trainer of 1-step epochs that writes its checkpoints to ``tmp_path/run``; with
    ``summaries``, each epoch's evaluation returns the next of them instead of evaluating."""
    config = toy_config(toy_assets, tmp_path, "translate-train", **{
        "languages": ["en", "de"], "trainer.max_steps_per_epoch": 1, **flat})
    trainer, _ = make_trainer(config)
    trainer.run_dir = tmp_path / "run"
    trainer.run_dir.mkdir()
    if summaries is not None:
        it = iter(summaries)
        trainer.evaluate = lambda: next(it)
    return trainer


def summary(r1, medr):
    return {"mean": {"t2v": {"R1": r1, "R5": 50.0, "R10": 70.0, "MedR": medr}}}


def test_learning_rate_decays_by_gamma_every_epoch(toy_assets, tmp_path):
    lr, gamma, epochs = 2e-3, 0.5, 3
    trainer = short_run(toy_assets, tmp_path, [summary(10.0, 5.0)] * epochs, **{
        "optimizer.lr": lr, "scheduler.gamma": gamma, "trainer.epochs": epochs})
    used, step = [], trainer.training_step

    def recording_step(batch):
        used.append(trainer.optimizer.param_groups[0]["lr"])
        return step(batch)

    trainer.training_step = recording_step
    trainer.fit()
    assert trainer.epoch == epochs and trainer.step == epochs
    assert used == pytest.approx([lr, lr * gamma, lr * gamma ** 2], rel=1e-12)
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(lr * gamma ** epochs, rel=1e-12)
    saved = load_checkpoint(tmp_path / "run" / "latest.pt")
    assert saved["scheduler"]["last_epoch"] == epochs
    assert saved["optimizer"]["param_groups"][0]["lr"] == pytest.approx(lr * gamma ** epochs, rel=1e-12)


def test_training_logs_the_learning_rate_and_throughput_beside_the_loss(toy_assets, tmp_path):
    """A train.py run records, at every logged step, the learning rate the step used (the configured
    one, decayed once per epoch) and a finite, positive throughput, in its metrics.json."""
    import json
    import math

    import train as train_entry
    lr, gamma = 2e-3, 0.5
    config = toy_config(toy_assets, tmp_path, "translate-train", **{
        "languages": ["en", "de"], "trainer.max_steps_per_epoch": 2, "trainer.epochs": 2, "trainer.log_every": 1,
        "optimizer.lr": lr, "scheduler.gamma": gamma})
    path = write_json_config(tmp_path, "logged", config)
    assert train_entry.main(["-c", str(path), "--run-id", "1", "-d", "cpu"]) == 0
    metrics = json.loads((tmp_path / "runs" / "logged" / "1" / "metrics.json").read_text())
    steps = [1, 2, 3, 4]
    assert metrics["train.loss"]["steps"] == metrics["train.lr"]["steps"] == metrics["train.samples_per_s"]["steps"] \
        == steps
    assert metrics["train.lr"]["values"] == pytest.approx([lr, lr, lr * gamma, lr * gamma], rel=1e-12)
    assert all(math.isfinite(v) and v > 0 for v in metrics["train.samples_per_s"]["values"])


def test_accumulation_steps_must_divide_the_per_process_batch(toy_assets, tmp_path):
    from common.errors import ConfigError
    with pytest.raises(ConfigError, match="config key 'trainer.accumulation_steps' = 3 does not divide the "
                                          "per-process batch of 16$"):
        make_trainer(toy_config(toy_assets, tmp_path, **{"trainer.accumulation_steps": 3}))


def test_settings_training_refuses_are_refused_before_the_teachers_work(toy_assets, tmp_path, capsys):
    """The checks that need only the config and the data run before build_teachers, which may embed
    the whole training set: the teacher file here does not exist, yet the error names the setting."""
    import train as train_entry
    missing = tmp_path / "missing_teacher.pt"
    for key, value, message in [("trainer.accumulation_steps", 3, "does not divide the per-process batch of 16"),
                                ("model.pool_with_student_mask", True, "training with it is not supported")]:
        config = toy_config(toy_assets, tmp_path, "c2kd", teachers=[str(missing)], **{key: value})
        path = write_json_config(tmp_path, "early", config)
        assert train_entry.main(["-c", str(path), "--run-id", key, "-d", "cpu"]) == 2
        err = capsys.readouterr().err
        assert message in err and str(missing) not in err, err


# ---- 4. best.pt ------------------------------------------------------------------------------------

@pytest.mark.parametrize("monitor, best, better, worse", [
    ("t2v_mean_R1", 30.0, 31.0, 29.0),
    ("v2t_de_R10", 30.0, 30.5, 29.5),
    ("t2v_mean_MedR", 4.0, 3.0, 5.0),
    ("t2v_en_MeanR", 4.0, 3.5, 4.5),
])
def test_improves_is_higher_for_recall_and_lower_for_ranks(toy_assets, tmp_path, monitor, best, better, worse):
    trainer = short_run(toy_assets, tmp_path)
    trainer.best = None
    assert trainer._improves(monitor, {monitor: worse}) is True  # the first epoch always counts
    trainer.best = best
    assert trainer._improves(monitor, {monitor: better}) is True
    assert trainer._improves(monitor, {monitor: worse}) is False
    assert trainer._improves(monitor, {monitor: best}) is False  # a tie keeps the earlier epoch


@pytest.mark.parametrize("monitor, values, best_epoch", [
    ("t2v_mean_R1", [10.0, 30.0, 20.0], 2),
    ("t2v_mean_MedR", [5.0, 3.0, 4.0], 2),
])
def test_best_checkpoint_is_not_overwritten_by_a_worse_epoch(toy_assets, tmp_path, monitor, values, best_epoch):
    summaries = [summary(v, 5.0) if monitor.endswith("R1") else summary(20.0, v) for v in values]
    trainer = short_run(toy_assets, tmp_path, summaries, **{
        "trainer.epochs": len(values), "trainer.monitor": monitor})
    trainer.fit()
    best = load_checkpoint(tmp_path / "run" / "best.pt")
    latest = load_checkpoint(tmp_path / "run" / "latest.pt")
    assert best["epoch"] == best_epoch and best["best"] == values[best_epoch - 1]
    assert latest["epoch"] == len(values) and latest["best"] == values[best_epoch - 1]
    changed = [name for name in best["model"] if not torch.equal(best["model"][name], latest["model"][name])]
    assert changed  # best.pt holds the weights of its epoch, not the last one


# ---- 5. checkpoints never run code -----------------------------------------------------------------

class RunsAShellCommand:
    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def test_loading_a_checkpoint_never_runs_its_code(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"format": FORMAT, "version": VERSION, "epoch": 1,
                "model": {"w": torch.ones(2)}, "payload": RunsAShellCommand(f"echo pwned > {marker}")}, path)
    try:
        load_checkpoint(path)
        refusal = None
    except CheckpointError as e:
        refusal = str(e)
    assert not marker.exists()  # the command never ran
    assert refusal is not None and refusal.startswith(f"{path}: not a readable checkpoint ("), refusal
    # The same file without the payload loads: the refusal is of the code, not of the file.
    torch.save({"format": FORMAT, "version": VERSION, "epoch": 1, "model": {"w": torch.ones(2)}}, path)
    assert load_checkpoint(path)["epoch"] == 1
