"""Interruptions lose nothing; bad files and configs are refused in one line before anything runs."""
import errno
import json
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import assert_same_weights, make_trainer, toy_config, untrained_teachers, write_json_config
from common.checkpoint import (FORMAT, VERSION, CheckpointError, atomic_save, checkpoint_header, load_checkpoint,
                              save_checkpoint)

ROOT = Path(__file__).resolve().parents[1]


def train_cli(*args, **kwargs):
    return subprocess.run([sys.executable, "train.py", "-d", "cpu", *args], cwd=ROOT, capture_output=True,
                          text=True, **kwargs)


def interrupt_mid_epoch(config_path, run_id, epoch=2, after_steps=3):
    """Start training, send SIGTERM once the progress bar shows ``after_steps`` steps of ``epoch``."""
    proc = subprocess.Popen([sys.executable, "train.py", "-c", str(config_path), "--run-id", run_id, "-d", "cpu"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    seen = bytearray()
    marker = f"epoch {epoch}:".encode()

    def watch():
        nonlocal marker
        while True:
            chunk = os.read(proc.stderr.fileno(), 4096)
            if not chunk:
                return
            seen.extend(chunk)
            tail = bytes(seen[-400:])
            # The bar may skip a count between refreshes: any count from after_steps on will do.
            counts = re.findall(rb"\| *(\d+)/", tail.split(marker)[-1]) if marker in tail else []
            if proc.returncode is None and counts and int(counts[-1]) >= after_steps:
                proc.send_signal(signal.SIGTERM)
                marker = b"\0never"  # signal once, keep reading to the end

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    proc.wait(timeout=300)
    thread.join(timeout=10)
    return proc.returncode, seen.decode(errors="replace")


@pytest.mark.parametrize("stage", ["translate-train", "c2kd"])
def test_sigterm_mid_epoch_then_resume_reproduces_the_uninterrupted_run(toy_assets, tmp_path, stage):
    teachers = untrained_teachers(toy_assets, tmp_path) if stage == "c2kd" else ()
    config = toy_config(toy_assets, tmp_path, stage, teachers, **{
        "data.batch_size": 8, "trainer.epochs": 3})
    path = write_json_config(tmp_path, "run", config)
    full = train_cli("-c", str(path), "--run-id", "full")
    assert full.returncode == 0, full.stderr[-2000:]

    code, stderr = interrupt_mid_epoch(path, "cut")
    assert code == 128 + signal.SIGTERM, stderr[-2000:]
    assert "stopped by SIGTERM" in stderr and "resume with: python train.py -r" in stderr
    checkpoint = tmp_path / "runs" / "run" / "cut" / "latest.pt"
    state = load_checkpoint(checkpoint)
    assert (state["epoch"], state["batches_done"]) > (1, 0)  # stopped inside epoch 2 or later
    assert json.loads((checkpoint.parent / "run.json").read_text())["status"] == "INTERRUPTED"

    resumed = train_cli("-r", str(checkpoint), "--run-id", "resumed")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a = load_checkpoint(tmp_path / "runs" / "run" / "full" / "latest.pt")
    b = load_checkpoint(tmp_path / "runs" / "run" / "resumed" / "latest.pt")
    assert a["step"] == b["step"] == 3 * (128 // 8)
    runs = tmp_path / "runs" / "run"
    assert_same_weights(runs / "full" / "latest.pt", runs / "resumed" / "latest.pt")


def test_sigkill_leaves_the_last_checkpoint_intact(toy_assets, tmp_path):
    config = toy_config(toy_assets, tmp_path, "translate-train", **{
        "data.batch_size": 8, "trainer.epochs": 50})
    path = write_json_config(tmp_path, "run", config)
    proc = subprocess.Popen([sys.executable, "train.py", "-c", str(path), "--run-id", "k", "-d", "cpu"],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoint = tmp_path / "runs" / "run" / "k" / "latest.pt"
    deadline = time.time() + 120
    while not checkpoint.exists() and time.time() < deadline:
        time.sleep(0.05)
    # Kill right after the second checkpoint appeared, while the run goes on writing: the file must load.
    mtime = checkpoint.stat().st_mtime_ns
    while checkpoint.stat().st_mtime_ns == mtime and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    state = load_checkpoint(checkpoint)
    assert state["epoch"] >= 2


def test_failed_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = save_checkpoint({"epoch": 1, "model": {"w": torch.ones(3)}}, tmp_path / "latest.pt")

    def full_disk(obj, f, *args, **kwargs):
        f.write(b"partial bytes")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(CheckpointError, match="latest.pt: cannot write \\(No space left on device\\); "
                                              "the previous file is unchanged"):
        save_checkpoint({"epoch": 2}, path)
    monkeypatch.undo()
    assert load_checkpoint(path)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["latest.pt"]  # no temporary file left behind
    with pytest.raises(CheckpointError, match="cannot write"):
        atomic_save({"x": 1}, tmp_path / "latest.pt" / "inside-a-file.pt")


def test_a_checkpoint_header_has_the_run_but_not_its_tensors(tmp_path):
    """train.py reads the config and epoch of the checkpoint it resumes from its header, through a
    memory map: the weights and optimizer state are read once, by the trainer."""
    config = {"name": "c2kd", "trainer": {"epochs": 5}}
    path = save_checkpoint({"epoch": 3, "step": 30, "config": config, "model": {"w": torch.ones(3)},
                            "optimizer": {"state": {0: {"exp_avg": torch.zeros(3)}}, "param_groups": [{"lr": 0.1}]},
                            "rng": [torch.zeros(2, dtype=torch.uint8)]}, tmp_path / "latest.pt")
    assert checkpoint_header(path) == {"format": FORMAT, "version": VERSION, "epoch": 3, "step": 30, "config": config}
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="junk.pt: not a readable checkpoint"):
        checkpoint_header(tmp_path / "junk.pt")


# ---- bad input: one line, exit code 2, nothing trained or overwritten ------------------------------

def released_train_items(n=6, dim=512):
    rng = np.random.default_rng(0)
    return [{"id": f"v{i}", "2d": rng.normal(size=(5, dim)).astype(np.float32),
             "caption_en": [f"a cat {i}"], "caption_de": [f"eine Katze {i}"]} for i in range(n)]


def pickled(tmp_path, name, obj, cut=None):
    import pickle
    data = pickle.dumps(obj, protocol=4)
    path = tmp_path / name
    path.write_bytes(data[:cut] if cut else data)
    return path


class Exec:
    def __reduce__(self):
        return (exec, ("open('/tmp/should-not-exist', 'w')",))


def bad_data_cases(tmp_path):
    items = released_train_items()
    nan = released_train_items()
    nan[2]["2d"][1, 3] = np.nan
    nan[4]["2d"][0, 0] = np.inf
    dup = released_train_items()
    dup[3]["id"] = "v1"
    empty = released_train_items()
    empty[5]["caption_en"], empty[5]["caption_de"] = [], []
    mixed = released_train_items()
    mixed[4]["2d"] = mixed[4]["2d"][:, :500]
    return {
        "truncated": (pickled(tmp_path, "cut.pkl", items, cut=-50), "not a readable pickle"),
        "executes code": (pickled(tmp_path, "exec.pkl", [Exec()]), "refused global builtins.exec"),
        "wrong structure": (pickled(tmp_path, "dict.pkl", {"items": items}), "expected a list of dicts"),
        "wrong dimension": (pickled(tmp_path, "dim.pkl", released_train_items(dim=1024)),
                            "has dimension 1024, but config key 'data.feature_dim' is 512"),
        "one item's dimension": (pickled(tmp_path, "mixed.pkl", mixed),
                                 "has dimension 500 in item v4 (1 item(s) in all), but config key "
                                 "'data.feature_dim' is 512"),
        "no caption": (pickled(tmp_path, "empty.pkl", empty), "item(s) without any caption in the languages read "
                       "(en, de; config key 'languages'): v5"),
        "duplicate ids": (pickled(tmp_path, "dup.pkl", dup), "duplicate id(s): v1"),
        "nan features": (pickled(tmp_path, "nan.pkl", nan), "NaN or infinite video features in item(s) v2, v4"),
    }


@pytest.mark.parametrize("case", ["truncated", "executes code", "wrong structure", "wrong dimension",
                                  "one item's dimension", "no caption", "duplicate ids", "nan features"])
def test_bad_data_files_are_refused_before_training(toy_assets, tmp_path, case):
    path, message = bad_data_cases(tmp_path)[case]
    config = toy_config(toy_assets, tmp_path, "translate-train", **{
        "data.train_path": str(path)})
    result = train_cli("-c", str(write_json_config(tmp_path, "bad", config)))
    assert result.returncode == 2
    err = result.stderr.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    assert str(path) in err and message in err, err
    assert not list((tmp_path / "runs").glob("*/*/latest.pt"))
    assert not Path("/tmp/should-not-exist").exists()


@pytest.mark.parametrize("overrides, message", [
    ({"data.batch_size": 1000}, "training items, fewer than config key 'data.batch_size' = 1000"),
    ({"eval.total_queries": 3}, "config key 'eval.total_queries' = 3 is smaller than the"),
    ({"model.pool_with_student_mask": True, "model.pool_mask_tokenizer": "LABSE"}, "training with it is not supported"),
    ({"data.train_path": "FOLDER"}, "a folder or safe-layout files, but config key 'data.layout' is 'multi-msrvtt'"),
    ({"trainer.monitor": "t2v_mean_R2"}, "config key 'trainer.monitor' = 't2v_mean_R2' is not an evaluation metric"),
])
def test_settings_that_cannot_train_are_refused_before_training(toy_assets, tmp_path, overrides, message):
    if overrides.get("data.train_path") == "FOLDER":
        overrides = {"data.train_path": str(tmp_path)}
    if overrides.get("model.pool_mask_tokenizer") == "LABSE":
        overrides = {**overrides, "model.pool_mask_tokenizer": str(toy_assets["encoders"]["labse-tiny"])}
    config = toy_config(toy_assets, tmp_path, "translate-train", **overrides)
    result = train_cli("-c", str(write_json_config(tmp_path, "bad", config)))
    err = result.stderr.strip()
    assert result.returncode == 2 and err.startswith("error: ") and "\n" not in err, err
    assert message in err, err
    assert not list((tmp_path / "runs").glob("*/*/latest.pt"))


def test_a_run_that_failed_before_its_first_checkpoint_can_be_run_again_under_its_id(toy_assets, tmp_path):
    bad = toy_config(toy_assets, tmp_path, "translate-train", **{"data.batch_size": 1000})
    result = train_cli("-c", str(write_json_config(tmp_path, "retry", bad)), "--run-id", "seed0")
    folder = tmp_path / "runs" / "retry" / "seed0"
    assert result.returncode == 2 and json.loads((folder / "run.json").read_text())["status"] == "FAILED"
    good = toy_config(toy_assets, tmp_path, "translate-train", **{"trainer.epochs": 1,
                                                                    "trainer.max_steps_per_epoch": 2})
    result = train_cli("-c", str(write_json_config(tmp_path, "retry", good)), "--run-id", "seed0")
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"replacing {folder}: its run (FAILED) stopped before writing a checkpoint" in result.stdout
    assert json.loads((folder / "run.json").read_text())["status"] == "COMPLETED"
    # A run that did write a checkpoint is never replaced: the same command finds it finished.
    written = (folder / "latest.pt").stat().st_mtime_ns
    result = train_cli("-c", str(write_json_config(tmp_path, "retry", good)), "--run-id", "seed0")
    assert result.returncode == 0 and "finished with this config, nothing to train" in result.stdout
    assert (folder / "latest.pt").stat().st_mtime_ns == written


def test_bad_checkpoints_and_run_folders_are_refused(toy_assets, tmp_path):
    config = toy_config(toy_assets, tmp_path, "translate-train")
    path = write_json_config(tmp_path, "ok", config)
    # A checkpoint of another architecture (a wider video transformer).
    other = toy_config(toy_assets, tmp_path, "translate-train", **{"model.width": 64})
    from model.model import build_model
    state = {"model": build_model(other["model"], 512).state_dict(), "config": other, "epoch": 1, "step": 1}
    wide = save_checkpoint(state, tmp_path / "wide.pt")
    result = subprocess.run([sys.executable, "test.py", "-r", str(wide), "-c", str(path), "-d", "cpu"], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 2 and "weights do not fit the model" in result.stderr
    assert "\n" not in result.stderr.strip()
    # A saved config with a key this version does not know: the error names the checkpoint.
    odd = save_checkpoint({**state, "config": {**config, "trainer": {**config["trainer"], "warmup": 3}}},
                          tmp_path / "odd.pt")
    for entry in ("test.py", "train.py"):
        result = subprocess.run([sys.executable, entry, "-r", str(odd), "-d", "cpu"], cwd=ROOT,
                                capture_output=True, text=True)
        err = result.stderr.strip()
        assert result.returncode == 2 and "\n" not in err and "'trainer.warmup'" in err, err
        assert err.endswith(f"(in the config saved in {odd})"), err
    # ...but a typo of the command line's own is not blamed on the checkpoint.
    result = subprocess.run([sys.executable, "test.py", "-r", str(wide), "--set", "trainer.epoch=3", "-d", "cpu"],
                            cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 2 and result.stderr.strip() == "error: unknown config key 'trainer.epoch'", \
        result.stderr
    # Weights without training state (a converted reference checkpoint looks like this).
    weights = save_checkpoint({"model": build_model(config["model"], 512).state_dict(), "config": config,
                               "epoch": 0, "step": 0}, tmp_path / "weights.pt")
    result = train_cli("-r", str(weights))
    assert result.returncode == 2 and f"{weights}: holds model weights but no training state" in result.stderr
    assert "\n" not in result.stderr.strip()
    # The checks below refuse before a run folder is made (the one above runs and fails in its folder).
    def run_folders():
        return sorted(p.parent for p in (tmp_path / "runs").rglob("run.json"))
    folders = run_folders()
    assert folders  # the refusal above was recorded in a (FAILED) run folder, so the listing would see one
    # A checkpoint that has trained every epoch its config asks for.
    done = save_checkpoint({**load_checkpoint(weights), "epoch": config["trainer"]["epochs"]}, tmp_path / "done.pt")
    result = train_cli("-r", str(done))
    assert result.returncode == 2 and "has already trained 2 of config key 'trainer.epochs' = 2 epochs" in result.stderr
    # Resuming with another learning rate or decay: the saved optimizer and scheduler states would
    # silently keep the old ones.
    result = train_cli("-r", str(weights), "--lr", "0.5")
    assert result.returncode == 2 and result.stderr.strip() == (
        f"error: {weights}: config key 'optimizer.lr' = 0.5 differs from the checkpoint's "
        f"{config['optimizer']['lr']}; a resumed run continues the saved optimizer and schedule, so keep it, or "
        "start a new run")
    result = train_cli("-r", str(weights), "--set", "scheduler.gamma=0.5")
    assert result.returncode == 2 and "config key 'scheduler.gamma' = 0.5 differs from the checkpoint's" in result.stderr
    assert run_folders() == folders  # refused before a run folder was made
    # A truncated checkpoint.
    cut = tmp_path / "cut.pt"
    cut.write_bytes(wide.read_bytes()[:2000])
    result = train_cli("-r", str(cut))
    assert result.returncode == 2 and f"{cut}: not a readable checkpoint" in result.stderr
    # A checkpoint written by a newer version of the code.
    from common.checkpoint import FORMAT, VERSION
    newer = atomic_save({**load_checkpoint(wide), "format": FORMAT, "version": VERSION + 1}, tmp_path / "newer.pt")
    result = train_cli("-r", str(newer))
    assert result.returncode == 2 and f"{newer}: checkpoint format version {VERSION + 1} is newer" in result.stderr
    # A device torch does not know.
    result = train_cli("-c", str(path), "-d", "gpu0")
    assert result.returncode == 2 and "-d 'gpu0' is not a torch device" in result.stderr
    assert "\n" not in result.stderr.strip()
    # A run folder that cannot be written.
    blocked = tmp_path / "blocked"
    blocked.write_text("a file where the run folder should go")
    result = train_cli("-c", str(path), "--set", f"trainer.save_dir={blocked}")
    assert result.returncode == 2 and "cannot write run folders here" in result.stderr
    # A config that is not JSON.
    broken = tmp_path / "broken.json"
    broken.write_text("{'single': 'quotes'}")
    result = train_cli("-c", str(broken))
    assert result.returncode == 2 and "broken.json: not valid JSON" in result.stderr


def test_unwritable_outputs_are_one_line_errors_before_any_work(toy_assets, tmp_path):
    from model.model import build_model
    blocked = tmp_path / "a_file"
    blocked.write_text("not a folder")
    config = toy_config(toy_assets, tmp_path, "translate-train")
    checkpoint = save_checkpoint({"model": build_model(config["model"], 512).state_dict(), "config": config,
                                  "epoch": 0, "step": 0}, tmp_path / "weights.pt")
    commands = {
        "test.py": ["test.py", "-r", str(checkpoint), "-d", "cpu", "--save-sims", str(blocked / "sims")],
        "convert": ["-m", "data_loader.convert", str(toy_assets["test"]), str(blocked / "safe")],
    }
    for name, args in commands.items():
        result = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True)
        err = result.stderr.strip()
        assert result.returncode == 2 and err == f"error: {blocked}/{args[-1].split('/')[-1]}: Not a directory", \
            (name, err[-500:])
        assert "R1" not in result.stdout  # nothing was evaluated or converted first


def test_debug_flag_shows_the_traceback(tmp_path):
    broken = tmp_path / "broken.json"
    broken.write_text("{")
    result = train_cli("-c", str(broken), "--debug")
    assert result.returncode != 0 and "Traceback" in result.stderr


OVERFLOWING_TEMPERATURE = 1e-39  # similarities / τ exceed float32's range


def test_non_finite_loss_stops_the_run_naming_step_terms_and_items(toy_assets, tmp_path):
    # A temperature so small (but above 0, the smallest the config admits) that the logits overflow
    # float32: the very first loss is not finite.
    config = toy_config(toy_assets, tmp_path, "translate-train", **{
        "loss.temperature": OVERFLOWING_TEMPERATURE})
    result = train_cli("-c", str(write_json_config(tmp_path, "nan", config)))
    err = result.stderr.strip().splitlines()[-1]  # after the progress bar of the epoch it stopped in
    assert result.returncode == 2, result.stderr
    assert err.startswith("error: non-finite loss nan at step 1 (epoch 1); terms: nce_main=nan")
    assert "; items: toy" in err and "(+8 more)" in err  # the batch's item ids (16 items, 8 shown)
    assert not list((tmp_path / "runs").glob("*/*/latest.pt"))


def test_mixed_precision_modes_and_the_gradient_scaler(toy_assets, tmp_path, monkeypatch):
    """fp16 autocast gets a gradient scaler, bf16 and fp32 do not; the CPU always trains in fp32."""
    import trainer.trainer
    from common.device import amp_dtype
    cuda, cpu = torch.device("cuda"), torch.device("cpu")  # a device name: no GPU is touched
    assert amp_dtype(cuda, "fp16") is torch.float16 and amp_dtype(cuda, "bf16") is torch.bfloat16
    assert amp_dtype(cuda, "off") is None
    assert all(amp_dtype(cpu, mode) is None for mode in ("fp16", "bf16", "auto", "off"))
    config = toy_config(toy_assets, tmp_path, "translate-train")
    for dtype, scaled in ((torch.float16, True), (torch.bfloat16, False), (None, False)):
        monkeypatch.setattr(trainer.trainer, "amp_dtype", lambda device, mode, dtype=dtype: dtype)
        assert make_trainer(config)[0].scaler.is_enabled() == scaled, dtype


def test_fp16_scaler_skips_non_finite_steps_then_stops(toy_assets, tmp_path):
    """The fp16 path (a gradient scaler instead of the finiteness check), with PyTorch's GradScaler
    on the CPU: steps with non-finite gradients are skipped and counted, and the run stops once
    more than trainer.max_skipped_steps were skipped."""
    from trainer.trainer import NonFiniteLoss
    trainer, batch = make_trainer(toy_config(toy_assets, tmp_path, "translate-train", **{
        "loss.temperature": OVERFLOWING_TEMPERATURE, "trainer.max_skipped_steps": 2}))
    model = trainer.model
    # What fp16 training builds (test_mixed_precision_modes_and_the_gradient_scaler), on the CPU.
    trainer.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for skipped in (1, 2):
        trainer.training_step(batch)
        assert trainer.skipped_steps == skipped
    assert trainer.scaler.get_scale() == 2.0 ** 14  # halved at each skipped step
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # no update was applied
    with pytest.raises(NonFiniteLoss, match="skipped 3 steps .*max_skipped_steps = 2.*nce_main=nan"):
        trainer.training_step(batch)


def test_epoch_loss_leaves_out_steps_the_fp16_scaler_skipped(toy_assets, tmp_path):
    """A skipped step's non-finite loss does not make the epoch's mean loss NaN; the mean is over the
    steps that trained, across a mid-epoch checkpoint too."""
    trainer, _ = make_trainer(toy_config(toy_assets, tmp_path, "translate-train", **{
        "trainer.max_steps_per_epoch": 4}))
    trainer.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16)  # the fp16 path, on the CPU
    temperature, losses, real_step = trainer.loss_fn.temperature, [], trainer.training_step

    def step(batch):  # the second step divides by a zero temperature: a NaN loss, skipped by the scaler
        trainer.loss_fn.temperature = 0.0 if len(losses) == 1 else temperature
        loss, terms = real_step(batch)
        losses.append(loss.item())
        return loss, terms

    trainer.training_step = step
    mean = trainer.train_epoch()
    assert len(losses) == 4 and math.isnan(losses[1]) and trainer.skipped_steps == 1
    finite = [losses[0], *losses[2:]]
    assert mean == pytest.approx(sum(finite) / 3, rel=1e-6)

    state = trainer.state_dict()
    assert state["epoch_loss_steps"] == 3
    resumed, _ = make_trainer(toy_config(toy_assets, tmp_path, "translate-train", **{
        "trainer.max_steps_per_epoch": 4}))
    resumed.load_state_dict(state, "state")
    assert resumed.train_epoch() == pytest.approx(mean, rel=1e-6)  # all 4 steps already taken
    del state["epoch_loss_steps"]  # as written before the count was saved: every step counted
    resumed.load_state_dict(state, "state")
    assert resumed.train_epoch() == pytest.approx(state["epoch_loss_sum"] / 4, rel=1e-6)


def test_a_run_resumed_under_fp16_starts_a_fresh_gradient_scaler(toy_assets, tmp_path):
    """A checkpoint of a run without fp16 (bf16 on another GPU, or the CPU) holds no scaler state."""
    config = toy_config(toy_assets, tmp_path, "translate-train")
    saved, batch = make_trainer(config)
    saved.training_step(batch)
    state = saved.state_dict()
    assert state["scaler"] == {}
    resumed, _ = make_trainer(config)
    resumed.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)  # the fp16 path, on the CPU
    resumed.load_state_dict(state, "bf16.pt")
    assert resumed.scaler.get_scale() == 2.0 ** 10
    assert resumed.optimizer.state_dict()["state"]  # the rest of the state was loaded: Adam's moments


def test_a_mid_epoch_resume_over_another_number_of_training_items_is_refused(toy_assets, tmp_path):
    """The checkpoint counts the epoch in batches of its shuffle of the training items; over another
    training set that order is another one, and items would be skipped or repeated."""
    trainer, _ = make_trainer(toy_config(toy_assets, tmp_path, "translate-train"))
    items = len(trainer.train_loader.dataset)
    state = {**trainer.state_dict(), "batches_done": 3, "train_items": items + 10}
    with pytest.raises(CheckpointError, match=f"mid.pt: stopped 3 batches into an epoch over {items + 10} training "
                                              f"items, but the training data now has {items}; resume with the same"):
        trainer.load_state_dict(state, "mid.pt")
    trainer.load_state_dict({**state, "batches_done": 0}, "end.pt")  # at an epoch's end: a new order anyway
    trainer.load_state_dict({**state, "train_items": items}, "same.pt")
    assert trainer.batches_done == 3


def test_checkpoints_with_one_random_state_still_resume(toy_assets, tmp_path):
    """Checkpoints written before every rank's random state was kept hold one state, not a list."""
    trainer, _ = make_trainer(toy_config(toy_assets, tmp_path, "translate-train"))
    state = trainer.state_dict()
    assert isinstance(state["rng"], list) and len(state["rng"]) == 1
    state["rng"] = state["rng"][0]
    expected = state["rng"]["torch"].clone()
    torch.manual_seed(1234)
    trainer.load_state_dict(state, "old.pt")
    assert torch.equal(torch.get_rng_state(), expected)


def test_settings_restored_on_resume_and_rank_seeds():
    from parse_config import ConfigError, resolve
    from trainer.state import seed_rank
    from trainer.trainer import check_resumable
    saved = resolve({"stage": "c2kd", "loss.teacher_pool": "learnable"})
    with pytest.raises(ConfigError, match="config key 'teachers.learnable_lr' = 0.5 differs"):
        check_resumable(saved, resolve({"stage": "c2kd", "loss.teacher_pool": "learnable",
                                        "teachers.learnable_lr": 0.5}), "c.pt")
    # Without learnable teacher weights the setting is used by nothing: a change is not refused.
    check_resumable(resolve({"stage": "c2kd"}), resolve({"stage": "c2kd", "teachers.learnable_lr": 0.5}), "c.pt")
    # What the run trains may not change; how long, where its files are and how it computes may.
    saved = resolve({"stage": "c2kd"})
    for key, value in (("seed", 1), ("data.batch_size", 32), ("loss.balance", 0.1), ("stage", "translate-train"),
                       ("trainer.max_steps_per_epoch", 3)):
        with pytest.raises(ConfigError, match=f"config key '{key}' = .* differs from the checkpoint's .*; a "
                                              "resumed run continues the same experiment"):
            check_resumable(saved, resolve({"stage": "c2kd", key: value}), "c.pt")
    check_resumable(saved, resolve({"stage": "c2kd", "trainer.epochs": 20, "data.train_path": "/moved/train.pkl",
                                    "teachers.mode": "online", "trainer.accumulation_steps": 2,
                                    "trainer.mixed_precision": "fp16", "data.num_workers": 0}), "c.pt")
    seed_rank(2**32 - 1, 3)  # the largest valid seed gives every rank a valid stream


def test_each_rank_resumes_its_own_random_state(toy_assets, tmp_path):
    """A two-process checkpoint holds one random state per rank: a process takes the state of its
    rank (one process continues rank 0's); a rank the checkpoint lacks starts a fresh stream."""
    from common.distributed import DistInfo
    config = toy_config(toy_assets, tmp_path, "translate-train")
    trainer, _ = make_trainer(config)
    state = trainer.state_dict()
    states = [{"torch": torch.manual_seed(seed).get_state(), "cuda": None} for seed in (10, 11)]
    state["rng"] = states
    for rank in (0, 1):
        trainer.dist = DistInfo(rank, 2)
        torch.manual_seed(1234)
        trainer.load_state_dict(state, "two_ranks.pt")
        assert torch.equal(torch.get_rng_state(), states[rank]["torch"]), rank
    trainer.dist = DistInfo(0, 1)
    trainer.load_state_dict(state, "two_ranks.pt")
    assert torch.equal(torch.get_rng_state(), states[0]["torch"])
    trainer.dist = DistInfo(2, 3)
    trainer.load_state_dict(state, "two_ranks.pt")
    assert not any(torch.equal(torch.get_rng_state(), s["torch"]) for s in states)


def test_saved_random_states_of_older_checkpoints_are_normalised():
    from trainer.state import saved_rng_states
    cpu, gpu0, gpu1 = torch.get_rng_state(), torch.zeros(16, dtype=torch.uint8), torch.ones(16, dtype=torch.uint8)
    # One state with every visible GPU's: the GPU of this rank's device is taken.
    [state] = saved_rng_states({"torch": cpu, "cuda": [gpu0, gpu1]}, torch.device("cuda", 1))
    assert torch.equal(state["torch"], cpu) and torch.equal(state["cuda"], gpu1)
    [state] = saved_rng_states({"torch": cpu, "cuda": []}, torch.device("cuda", 0))
    assert state["cuda"] is None
    states = saved_rng_states([{"torch": cpu, "cuda": None}, {"torch": cpu, "cuda": gpu0}], torch.device("cpu"))
    assert [s["cuda"] is None for s in states] == [True, False]
