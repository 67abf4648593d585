"""train.py under torchrun on the CPU (gloo): one node with two processes, two nodes with one process
each (both on this machine, so LOCAL_RANK is 0 on both ranks), and a resumed two-process run."""
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import assert_same_weights, toy_config, write_json_config
from common.checkpoint import load_checkpoint

ROOT = Path(__file__).resolve().parents[1]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(train_args, run_id, logs, nnodes=1, nproc_per_node=2):
    """Launch ``nnodes`` torchrun agents (one per 'node') of train.py; return the stdout of each.
    Output goes to files in ``logs`` (no pipe can fill up); a port taken in the meantime is retried."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # two processes on two cores
    for attempt in range(3):
        port = free_port()
        files = [(Path(logs) / f"{run_id}.{attempt}.{node}.out", Path(logs) / f"{run_id}.{attempt}.{node}.err")
                 for node in range(nnodes)]
        procs = []
        try:
            for node, (out, err) in enumerate(files):
                with open(out, "w") as stdout, open(err, "w") as stderr:
                    procs.append(subprocess.Popen(
                        [sys.executable, "-m", "torch.distributed.run", f"--nnodes={nnodes}",
                         f"--nproc_per_node={nproc_per_node}", f"--node_rank={node}", "--master_addr=127.0.0.1",
                         f"--master_port={port}", "train.py", *train_args, "--run-id", run_id, "-d", "cpu"],
                        cwd=ROOT, env=env, stdout=stdout, stderr=stderr))
            for p in procs:
                p.wait(timeout=400)
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
        errors = [err.read_text() for _, err in files]
        if attempt < 2 and any(p.returncode for p in procs) and any("address already in use" in e.lower()
                                                                    for e in errors):
            continue
        for p, error in zip(procs, errors):
            assert p.returncode == 0, error[-3000:]
        return [out.read_text() for out, _ in files]


@pytest.fixture(scope="module")
def two_process_run(toy_assets, tmp_path_factory):
    """Two epochs, one node, two processes; a checkpoint after every epoch."""
    tmp = tmp_path_factory.mktemp("torchrun")
    config = toy_config(toy_assets, tmp, "translate-train", **{
        "trainer.epochs": 2, "trainer.max_steps_per_epoch": 3, "trainer.save_period": 1})
    path = write_json_config(tmp, "ddp", config)
    [out] = torchrun(["-c", str(path)], "one_node", logs=tmp)
    return {"config_path": path, "runs": tmp / "runs" / "ddp", "stdout": out, "tmp": tmp}


def test_one_node_two_processes_writes_one_run_with_every_ranks_random_state(two_process_run):
    runs = two_process_run["runs"]
    assert sorted(p.name for p in runs.iterdir() if p.name != "_sources") == ["one_node"]
    assert two_process_run["stdout"].count("run folder:") == 1  # rank 0 alone logs
    assert two_process_run["stdout"].count("epoch 2/2") == 1
    state = load_checkpoint(runs / "one_node" / "latest.pt")
    assert not (runs / "one_node" / "best.pt").exists()  # trainer.monitor is off by default
    assert state["epoch"] == 2 and state["step"] == 6
    first, second = (s["torch"] for s in state["rng"])
    assert not torch.equal(first, second)  # each rank draws its own dropout masks
    assert (runs / "one_node" / "checkpoint-epoch1.pt").exists()


def test_two_nodes_train_exactly_as_one_node_with_as_many_processes(two_process_run):
    outputs = torchrun(["-c", str(two_process_run["config_path"])], "two_nodes", logs=two_process_run["tmp"],
                       nnodes=2, nproc_per_node=1)
    assert "run folder:" in outputs[0] and "run folder:" not in outputs[1]
    runs = two_process_run["runs"]
    assert_same_weights(runs / "two_nodes" / "latest.pt", runs / "one_node" / "latest.pt")


def test_resuming_two_processes_continues_each_ranks_stream(two_process_run):
    runs = two_process_run["runs"]
    torchrun(["-r", str(runs / "one_node" / "checkpoint-epoch1.pt")], "resumed", logs=two_process_run["tmp"])
    assert_same_weights(runs / "resumed" / "latest.pt", runs / "one_node" / "latest.pt")


def test_resuming_with_another_number_of_processes(two_process_run):
    runs = two_process_run["runs"]
    # One process continues a two-process checkpoint with rank 0's random state.
    result = subprocess.run([sys.executable, "train.py", "-r", str(runs / "one_node" / "checkpoint-epoch1.pt"),
                             "--run-id", "one_process", "-d", "cpu"], cwd=ROOT, capture_output=True, text=True,
                            timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]
    state = load_checkpoint(runs / "one_process" / "latest.pt")
    assert state["epoch"] == 2 and len(state["rng"]) == 1
    # Two processes continue a one-process checkpoint: rank 1 starts a stream of its own.
    torchrun(["-r", str(runs / "one_process" / "latest.pt"), "--epochs", "3"], "back_to_two",
             logs=two_process_run["tmp"])
    state = load_checkpoint(runs / "back_to_two" / "latest.pt")
    assert state["epoch"] == 3 and state["step"] == 9
    first, second = (s["torch"] for s in state["rng"])
    assert not torch.equal(first, second)


def test_an_existing_run_folder_is_judged_alike_by_every_process(two_process_run):
    """A finished run of the same config is reused by all processes (said once); one of another
    config, or a folder that is not a run, stops every process, and rank 0 alone says why."""
    def launch(run_id, *extra):
        return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
                               "--master_addr=127.0.0.1", f"--master_port={free_port()}", "train.py",
                               "-c", str(two_process_run["config_path"]), "--run-id", run_id, "-d", "cpu", *extra],
                              cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                              timeout=400)

    runs = two_process_run["runs"]
    reused = launch("one_node")
    assert reused.returncode == 0, reused.stderr[-3000:]
    assert reused.stdout.count(f"{runs / 'one_node'}: finished with this config, nothing to train") == 1
    other = launch("one_node", "--lr", "0.5")
    assert other.returncode != 0
    line = f"error: {runs / 'one_node'}: finished run of another config (optimizer.lr: "
    assert other.stderr.count(line) == 1, other.stderr[-3000:]
    (runs / "not_a_run").mkdir()
    foreign = launch("not_a_run")
    (runs / "not_a_run").rmdir()
    assert foreign.returncode != 0
    line = f"error: {runs / 'not_a_run'}: run folder exists; pick another --run-id or remove it"
    assert foreign.stderr.count(line) == 1, foreign.stderr[-3000:]
    bad = launch("bad", "--lr", "-1")  # a config error: every process finds it, rank 0 reports it
    assert bad.returncode != 0
    assert bad.stderr.count("error: ") == 1 and "error: config key 'optimizer.lr' = -1 must be above 0" in bad.stderr
    assert not (runs / "bad").exists()
