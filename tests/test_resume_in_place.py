"""A run that did not finish resumes in its own folder, and the reproduction pipeline picks what to
do with each run folder from its state (finished, resumable, failed before training, given weights)."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import assert_same_weights, toy_config, write_json_config
from tests.test_reliability import interrupt_mid_epoch, train_cli
from common.checkpoint import load_checkpoint
from trainer.experiment import continued_run_id, folder_state, lock_file

ROOT = Path(__file__).resolve().parents[1]


def read_json(path):
    return json.loads(Path(path).read_text())


def resume_command(stderr):
    """The arguments of the resume command that an interrupted run prints."""
    match = re.search(r"resume with: python train\.py -r (\S+)", stderr)
    assert match, stderr[-2000:]
    return ["-r", match.group(1)]


def assert_same_series(run, reference):
    """Every metric series of ``run`` holds one value per step, the same steps and values as
    ``reference`` (the epoch loss of the epoch resumed mid-way included; the throughput is a
    timing, so only its steps are compared)."""
    got, want = read_json(run / "metrics.json"), read_json(reference / "metrics.json")
    assert got.keys() == want.keys()
    for name in want:
        steps = got[name]["steps"]
        assert steps == want[name]["steps"], name
        assert len(got[name]["timestamps"]) == len(steps), name
        if name != "train.samples_per_s":
            assert got[name]["values"] == want[name]["values"], name


def test_interrupted_run_resumes_in_its_own_folder(toy_assets, tmp_path):
    config = toy_config(toy_assets, tmp_path, "translate-train", **{"data.batch_size": 8, "trainer.epochs": 3})
    path = write_json_config(tmp_path, "run", config)
    runs = tmp_path / "runs" / "run"
    full = train_cli("-c", str(path), "--run-id", "full")
    assert full.returncode == 0, full.stderr[-2000:]
    # The same command again reuses the finished run (settings that change no result aside); with
    # another config it stops and names what differs, and the finished run is left as it was.
    again = train_cli("-c", str(path), "--run-id", "full", "--set", "data.num_workers=1")
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"{runs / 'full'}: finished with this config, nothing to train" in again.stdout
    other = train_cli("-c", str(path), "--run-id", "full", "--epochs", "2")
    assert other.returncode == 2 and (f"{runs / 'full'}: finished run of another config (trainer.epochs: 3 in the "
                                      "run, 2 now)") in other.stderr, other.stderr
    assert read_json(runs / "full" / "run.json")["status"] == "COMPLETED" and not (runs / "1").exists()

    code, stderr = interrupt_mid_epoch(path, "seed0")
    assert code == 128 + signal.SIGTERM, stderr[-2000:]
    cut = runs / "seed0"
    assert read_json(cut / "run.json")["status"] == "INTERRUPTED"
    state = load_checkpoint(cut / "latest.pt")
    stopped_at = state["step"]

    # What a killed run leaves: status RUNNING, and values logged after its last checkpoint.
    killed = runs / "killed"
    shutil.copytree(cut, killed)
    record = read_json(killed / "run.json")
    (killed / "run.json").write_text(json.dumps({**record, "status": "RUNNING"}))
    metrics = read_json(killed / "metrics.json")
    loss = metrics["train.loss"]
    for step in (stopped_at + 1, stopped_at + 2):
        loss["steps"].append(step)
        loss["values"].append(123.0)
        loss["timestamps"].append(loss["timestamps"][-1])
    (killed / "metrics.json").write_text(json.dumps(metrics))

    copied = tmp_path / "elsewhere" / "copy"  # a run folder copied away from its config's save_dir
    shutil.copytree(cut, copied)
    first_cout = (cut / "cout.txt").read_text()
    assert "SIGTERM received: stopping after this step" in first_cout  # an interrupted run keeps its output

    # The command again, with another config, is refused; another checkpoint under its id too.
    other = train_cli("-c", str(path), "--run-id", "seed0", "--epochs", "4")
    assert other.returncode == 2 and (f"{cut}: unfinished run of another config (trainer.epochs: 3 in the run, "
                                      "4 now)") in other.stderr, other.stderr
    elsewhere = train_cli("-r", str(runs / "full" / "latest.pt"), "--run-id", "seed0", "--epochs", "4")
    assert elsewhere.returncode == 2 and (f"{cut}: its run did not finish; resume it with: python train.py -r "
                                          f"{cut / 'latest.pt'}") in elsewhere.stderr, elsewhere.stderr

    # A run that a live process holds is not resumed.
    lock = lock_file(cut / "run.json")
    try:
        busy = train_cli(*resume_command(stderr))
    finally:
        os.close(lock)
    assert busy.returncode == 2 and f"{cut}: its run is in progress in another process" in busy.stderr, busy.stderr

    # The printed command continues the run in its folder, under its id.
    resumed = train_cli(*resume_command(stderr))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"run folder: {cut}\n" in resumed.stdout
    again = train_cli("-c", str(path), "--run-id", "killed")  # the same command as the first attempt's
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"run folder: {killed}\n" in again.stdout
    assert sorted(p.name for p in runs.iterdir() if not p.name.startswith("_")) == ["full", "killed", "seed0"]
    for folder, earlier in ((cut, "INTERRUPTED"), (killed, "DIED")):  # killed: no process held its lock
        record = read_json(folder / "run.json")
        assert record["status"] == "COMPLETED" and record["result"]
        assert [a["status"] for a in record["earlier_attempts"]] == [earlier]
        assert read_json(folder / "config.json")["trainer"]["epochs"] == 3
        assert load_checkpoint(folder / "latest.pt")["step"] == 3 * (128 // 8)
        assert_same_weights(runs / "full" / "latest.pt", folder / "latest.pt")
        assert_same_series(folder, runs / "full")  # nothing lost or twice; redone steps replaced
    cout = (cut / "cout.txt").read_text()
    assert cout.startswith(first_cout) and "resumed from" in cout[len(first_cout):]  # the console output goes on
    moved = train_cli("-r", str(copied / "latest.pt"))  # continues in the copy, not in the config's save_dir
    assert moved.returncode == 0 and f"run folder: {copied}\n" in moved.stdout, moved.stderr[-2000:]
    assert read_json(copied / "run.json")["status"] == "COMPLETED"
    assert_same_weights(runs / "full" / "latest.pt", copied / "latest.pt")
    assert sorted(p.name for p in runs.iterdir() if not p.name.startswith("_")) == ["full", "killed", "seed0"]

    # A completed run is not reopened: training it further is a new run, or refused under its own id.
    finished = train_cli("-r", str(cut / "latest.pt"))
    assert finished.returncode == 2 and "has already trained 3 of config key 'trainer.epochs' = 3" in finished.stderr
    after = train_cli("-r", str(cut / "latest.pt"), "--epochs", "4")
    assert after.returncode == 0 and f"run folder: {runs / '1'}\n" in after.stdout, after.stderr[-2000:]
    refused = train_cli("-r", str(cut / "latest.pt"), "--run-id", "seed0", "--epochs", "4")
    assert refused.returncode == 2 and f"{cut}: run folder exists" in refused.stderr


def fake_run(folder, status=None, checkpoint=False):
    folder.mkdir(parents=True)
    if status:
        (folder / "run.json").write_text(json.dumps({"status": status}))
    if checkpoint:
        (folder / "latest.pt").write_bytes(b"weights")
    return folder


def test_continued_run_id(tmp_path):
    root = tmp_path / "runs" / "c2kd"
    cut = fake_run(root / "seed0", "INTERRUPTED", checkpoint=True)
    (cut / "checkpoint-epoch1.pt").write_bytes(b"weights")
    done = fake_run(root / "seed1", "COMPLETED", checkpoint=True)
    bare = fake_run(root / "seed2", checkpoint=True)
    assert continued_run_id(cut / "latest.pt", root) == "seed0"
    assert continued_run_id(cut / "latest.pt", root, "seed0") == "seed0"
    assert continued_run_id(cut / "latest.pt", root, "other") is None  # an explicit new run
    assert continued_run_id(cut / "checkpoint-epoch1.pt", root) is None  # not where the run stopped
    assert continued_run_id(cut / "latest.pt", tmp_path / "runs" / "other_name") is None
    assert continued_run_id(done / "latest.pt", root) is None
    assert continued_run_id(bare / "latest.pt", root) is None


def pipeline(tmp_path, seeds="0"):
    """scripts/reproduce/pipeline.sh msrvtt clip in a copy of the repository layout under ``tmp_path``,
    printing the commands it would run."""
    script = tmp_path / "scripts" / "reproduce" / "pipeline.sh"
    script.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(ROOT / "scripts" / "reproduce" / "pipeline.sh", script)
    env = {**os.environ, "DRY_RUN": "1", "SEEDS": seeds, "PY": sys.executable, "PYTHONPATH": str(ROOT)}
    return subprocess.run(["bash", str(script), "msrvtt", "clip", "--set", "data.num_workers=0"], env=env,
                          capture_output=True, text=True, check=False)


def test_pipeline_leaves_each_run_folder_to_train_py(tmp_path):
    runs = tmp_path / "runs" / "msrvtt" / "clip"
    fake_run(runs / "teacher_xlmr" / "seed0", "COMPLETED", checkpoint=True)
    fake_run(runs / "teacher_mbert" / "seed0", checkpoint=True)                  # converted weights
    fake_run(runs / "teacher_distill" / "seed0", "INTERRUPTED", checkpoint=True)  # half-trained teacher
    fake_run(runs / "zero_shot" / "seed0", "FAILED")                              # failed before training
    fake_run(runs / "c2kd" / "seed0", "RUNNING", checkpoint=True)                 # killed, no process left
    result = pipeline(tmp_path)
    assert result.returncode == 0, result.stderr
    extra = "--set data.num_workers=0"
    r = "runs/msrvtt/clip"
    assert result.stdout.splitlines() == [
        f"== {r}/teacher_xlmr/seed0 (finished)",
        f"env SEED=0 bash scripts/teacher_training/msrvtt/xlmr.sh {extra}",
        f"== teacher mbert: using the given weights {r}/teacher_mbert/seed0/latest.pt",
        f"== {r}/teacher_distill/seed0 (resume)",
        f"env SEED=0 bash scripts/teacher_training/msrvtt/distill.sh {extra}",
        f"== {r}/zero_shot/seed0 (rerun)",
        f"env SEED=0 bash scripts/zero_shot_baseline/msrvtt.sh {extra}",
        f"== {r}/translate_train/seed0 (new)",
        f"env SEED=0 bash scripts/translate_train_baseline/msrvtt.sh {extra}",
        f"== {r}/c2kd/seed0 (resume)",
        f"env SEED=0 bash scripts/c2kd/msrvtt.sh {extra}",
        (f"{sys.executable} -m utils.report --method Zero-shot={r}/zero_shot/seed0 "
         f"--method Translate-train={r}/translate_train/seed0 --method C2KD={r}/c2kd/seed0 "
         f"--recall 1,5,10 --out {r}/report"),
    ]

    # What train.py refuses stops the pipeline: a run in progress in another process, a student
    # folder that holds weights but no run record.
    c2kd = runs / "c2kd" / "seed0"
    def train_c2kd():
        return train_cli("-c", str(ROOT / "configs" / "toy" / "c2kd.json"), "--run-id", "seed0",
                         "--set", f"trainer.save_dir={runs.parent}", "--set", "name=clip/c2kd")
    lock = lock_file(c2kd / "run.json")
    try:
        busy = train_c2kd()
    finally:
        os.close(lock)
    assert busy.returncode == 2 and f"error: {c2kd}: its run is in progress in another process" in busy.stderr
    (c2kd / "run.json").unlink()
    assert folder_state(c2kd) == "weights"
    weights = train_c2kd()
    assert weights.returncode == 2 and f"error: {c2kd}: run folder exists" in weights.stderr, weights.stderr


@pytest.mark.parametrize("status, checkpoint, state", [
    (None, False, "foreign"), ("COMPLETED", False, "finished"), ("FAILED", True, "resume"),
    ("INTERRUPTED", False, "rerun")])
def test_folder_state(tmp_path, status, checkpoint, state):
    assert folder_state(tmp_path / "absent") == "new"
    assert folder_state(fake_run(tmp_path / "run", status, checkpoint)) == state

