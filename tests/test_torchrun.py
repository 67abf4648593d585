"""train.py under torchrun on the CPU (gloo): one node with two processes, two nodes with one process
each (both on this machine, so LOCAL_RANK is 0 on both ranks), and a resumed two-process run."""
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import toy_config, write_json_config

ROOT = Path(__file__).resolve().parents[1]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(train_args, run_id, nnodes=1, nproc_per_node=2):
    """Launch ``nnodes`` torchrun agents (one per 'node') of train.py; return the stdout of each."""
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # two processes on two cores
    procs = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", f"--nnodes={nnodes}",
                               f"--nproc_per_node={nproc_per_node}", f"--node_rank={node}",
                               "--master_addr=127.0.0.1", f"--master_port={port}",
                               "train.py", *train_args, "--run-id", run_id, "-d", "cpu"],
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for node in range(nnodes)]
    outputs = [p.communicate(timeout=400) for p in procs]
    for p, (_, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-3000:]
    return [out for out, _ in outputs]


def weights(path):
    return torch.load(path, map_location="cpu", weights_only=False)["model"]


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


@pytest.fixture(scope="module")
def two_process_run(toy_assets, tmp_path_factory):
    """Two epochs, one node, two processes; a checkpoint after every epoch."""
    tmp = tmp_path_factory.mktemp("torchrun")
    config = toy_config(toy_assets, tmp, "translate-train", **{
        "trainer.epochs": 2, "trainer.max_steps_per_epoch": 3, "trainer.save_period": 1})
    path = write_json_config(tmp, "ddp", config)
    [out] = torchrun(["-c", str(path)], "one_node")
    return {"config_path": path, "runs": tmp / "runs" / "ddp", "stdout": out}


def test_one_node_two_processes_writes_one_run_with_every_ranks_random_state(two_process_run):
    runs = two_process_run["runs"]
    assert sorted(p.name for p in runs.iterdir() if p.name != "_sources") == ["one_node"]
    assert two_process_run["stdout"].count("run folder:") == 1  # rank 0 alone logs
    assert two_process_run["stdout"].count("epoch 2/2") == 1
    state = torch.load(runs / "one_node" / "latest.pt", map_location="cpu", weights_only=False)
    assert state["epoch"] == 2 and state["step"] == 6
    first, second = (s["torch"] for s in state["rng"])
    assert not torch.equal(first, second)  # each rank draws its own dropout masks
    assert (runs / "one_node" / "checkpoint-epoch1.pt").exists()


def test_two_nodes_train_exactly_as_one_node_with_as_many_processes(two_process_run):
    outputs = torchrun(["-c", str(two_process_run["config_path"])], "two_nodes", nnodes=2, nproc_per_node=1)
    assert "run folder:" in outputs[0] and "run folder:" not in outputs[1]
    runs = two_process_run["runs"]
    assert_same_weights(weights(runs / "two_nodes" / "latest.pt"), weights(runs / "one_node" / "latest.pt"))


def test_resuming_two_processes_continues_each_ranks_stream(two_process_run):
    runs = two_process_run["runs"]
    torchrun(["-r", str(runs / "one_node" / "checkpoint-epoch1.pt")], "resumed")
    assert_same_weights(weights(runs / "resumed" / "latest.pt"), weights(runs / "one_node" / "latest.pt"))
