"""Every kind of bad input, through the real command lines: exit status 2, one line on stderr that
names the file, key or value and what is expected, and nothing written or overwritten. The many
values of one kind are checked on the validation functions (tests/test_config.py); here each
kind runs once as a process."""
import json
import os
import pickle
import resource
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from model.model import build_model
from tests.conftest import toy_config, write_json_config
from common.checkpoint import load_checkpoint, save_checkpoint

ROOT = Path(__file__).resolve().parents[1]


def cli(*args, env=None, limit_file_size=None):
    """(exit status, stdout, stderr) of ``python ARGS...`` in the repository, optionally under a
    file-size limit (writes past it fail with EFBIG, as on a full disk)."""
    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_file_size, limit_file_size))
    result = subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                            env={**os.environ, **(env or {})}, preexec_fn=limit if limit_file_size else None,
                            timeout=300)
    return result.returncode, result.stdout, result.stderr


def refused(result, *expected, trained=False):
    """The result is exit status 2 with one line on stderr that holds every ``expected`` text (after
    the progress bars, when it ``trained``)."""
    code, _, err = result
    lines = err.strip().splitlines()[-1:] if trained else err.strip().splitlines()
    assert "Traceback" not in err
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err[-2000:]
    for text in expected:
        assert str(text) in lines[0], (text, lines[0])
    return lines[0]


def files_under(folder):
    return sorted(p for p in Path(folder).rglob("*")) if Path(folder).exists() else []


@pytest.fixture
def weights(toy_assets, tmp_path):
    """An untrained translate-train checkpoint of the tiny model: enough for every refusal below."""
    config = toy_config(toy_assets, tmp_path, "translate-train")
    state = {"model": build_model(config["model"], 512).state_dict(), "config": config, "epoch": 0, "step": 0}
    return save_checkpoint(state, tmp_path / "weights.pt"), config


def test_nonsense_hyper_parameters_are_refused_before_anything_runs(toy_assets, tmp_path, weights):
    config = toy_config(toy_assets, tmp_path, "translate-train")
    path = write_json_config(tmp_path, "bad", config)
    data = json.loads(path.read_text())
    data["optimizer"]["lr"] = -1e-3
    path.write_text(json.dumps(data))
    refused(cli("train.py", "-c", path, "-d", "cpu"), path, "config key 'optimizer.lr' = -0.001 must be above 0")
    assert not (tmp_path / "runs").exists()
    # A C2KD student named as a teacher: a one-line refusal before the first step.
    student = save_checkpoint({**load_checkpoint(weights[0]), "config": {**weights[1], "stage": "c2kd"}},
                              tmp_path / "student.pt")
    c2kd = write_json_config(tmp_path, "c2kd", toy_config(toy_assets, tmp_path, "c2kd", [str(student)]))
    refused(cli("train.py", "-c", c2kd, "-d", "cpu", "--balance", "0.5"), student, "a C2KD student, not a teacher")
    assert not list((tmp_path / "runs").rglob("latest.pt"))


def nan_videos(tmp_path):
    rng = np.random.default_rng(0)
    items = [{"id": f"v{i}", "2d": rng.normal(size=(6, 512)).astype(np.float32), "caption_en": [f"a cat {i}"]}
             for i in range(4)]
    items[2]["2d"][1, 1] = np.nan
    path = tmp_path / "nan.pkl"
    path.write_bytes(pickle.dumps(items))
    return path


def test_demos_refuse_corrupt_videos_as_training_does(tmp_path, weights, capsys):
    import demo
    path = nan_videos(tmp_path)
    refused(cli("demo.py", "search", "-r", weights[0], "--videos", path, "--query", "a cat", "-d", "cpu",
                "--html", tmp_path / "hits.html"), path, "NaN or infinite video features in item(s) v2")
    assert not (tmp_path / "hits.html").exists()
    assert demo.main(["moments", "-r", str(weights[0]), "--video", f"{path}:v0", "--query", "a cat",
                      "-d", "cpu"]) == 2
    assert "NaN or infinite video features in item(s) v2" in capsys.readouterr().err


def test_queries_the_tokenizer_cannot_read_are_refused_and_cut_ones_announced(toy_assets, weights, capsys):
    import demo
    line = refused(cli("demo.py", "search", "-r", weights[0], "--videos", toy_assets["test"], "--query", "ሰላም ለዓለም",
                       "-d", "cpu"), "query 'ሰላም ለዓለም': the checkpoint's tokenizer (")
    assert "labse-tiny" in line and "reads this query as unknown tokens only" in line
    long_query = "a person cuts an onion " * 20
    with pytest.warns(UserWarning, match=r"query of 100 tokens cut to the first 22 \(config key "
                                         r"'data.max_words_eval'\): only 'a person cuts an onion"):
        assert demo.main(["search", "-r", str(weights[0]), "--videos", str(toy_assets["test"]), "--query",
                          long_query, "-d", "cpu", "--top", "1"]) == 0
    assert "rank" in capsys.readouterr().out


class ReferenceConfig:
    """Stands for the config object that the reference pickles into its checkpoints."""


def test_checkpoint_errors_are_the_projects_own_lines(tmp_path, weights, capsys):
    import test as test_entry
    import torch
    reference = tmp_path / "latest_model.pth"
    torch.save({"arch": "AVLnet", "state_dict": {"w": torch.ones(2)}, "config": ReferenceConfig()}, reference)
    line = refused(cli("test.py", "-r", reference, "-d", "cpu"), reference, "python -m utils.convert_checkpoint")
    assert "weights_only" not in line and "\x1b" not in line
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "latest.pt").write_bytes(b"")
    config = weights[1]
    wide = {**config, "model": {**config["model"], "width": 64}}
    other = save_checkpoint({"model": build_model(wide["model"], 512).state_dict(), "config": config, "epoch": 0,
                             "step": 0}, tmp_path / "other.pt")
    cases = {tmp_path / "empty.pt": "empty file (0 bytes)",
             tmp_path / "folder": "is a folder (it holds latest.pt); expected a checkpoint file",
             other: "weights do not fit the model its config describes: weight '"}
    for path, message in cases.items():
        assert test_entry.main(["-r", str(path), "-d", "cpu"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"error: {path}: {message}") and "\n" not in err, err
    assert "has shape [" in err  # the architecture's error names the weight and both shapes
    assert not (tmp_path / "eval").exists()


def test_a_full_disk_is_one_line_naming_the_run_folder(toy_assets, tmp_path):
    config = toy_config(toy_assets, tmp_path, "translate-train", **{"trainer.epochs": 1,
                                                                    "trainer.max_steps_per_epoch": 1})
    path = write_json_config(tmp_path, "disk", config)
    folder = tmp_path / "runs" / "disk" / "d"
    # Files may grow to 300 kB: the run's records fit, its checkpoint (about 700 kB) does not.
    refused(cli("train.py", "-c", path, "--run-id", "d", "-d", "cpu", limit_file_size=300_000),
            f"{folder / 'latest.pt'}: cannot write (File too large); the previous file is unchanged", trained=True)
    assert [p.name for p in folder.iterdir() if p.name.endswith(".tmp") or p.suffix == ".pt"] == []
    # Before the run starts: its record cannot be written, and the half-made folder is removed.
    refused(cli("train.py", "-c", path, "--run-id", "e", "-d", "cpu", limit_file_size=2_000),
            f"{tmp_path / 'runs' / 'disk' / 'e'}: cannot record the run (File too large)")
    assert not (tmp_path / "runs" / "disk" / "e").exists()


def test_run_ids_name_one_folder(toy_assets, tmp_path, capsys):
    import train as train_entry
    path = write_json_config(tmp_path, "ids", toy_config(toy_assets, tmp_path, "translate-train"))
    refused(cli("train.py", "-c", path, "--run-id", "../../escaped", "-d", "cpu"),
            "--run-id '../../escaped': expected a folder name")
    for run_id in ("", " ", "..", "a/b"):
        assert train_entry.main(["-c", str(path), "--run-id", run_id, "-d", "cpu"]) == 2
        assert "expected a folder name" in capsys.readouterr().err
    assert files_under(tmp_path / "runs") == [] and not (tmp_path.parent / "escaped").exists()


def test_values_of_the_wrong_type_name_the_key_and_the_file(tmp_path):
    path = tmp_path / "typed.json"
    path.write_text(json.dumps({"languages": [1, 2], "trainer": {"save_dir": str(tmp_path / "runs")}}))
    refused(cli("train.py", "-c", path, "-d", "cpu"),
            f"{path}: config key 'languages' must be a list of str or null, got [1, 2]")
    assert not (tmp_path / "runs").exists()


def test_a_reference_config_gets_one_migration_message(tmp_path):
    path = tmp_path / "23_msrvtt_c2kd.yaml"
    path.write_text("n_gpu: 1\narch: {type: AVLnet}\noptimizer: {type: Adam, args: {lr: 0.0001}}\n")
    refused(cli("train.py", "-c", path, "-d", "cpu"), f"{path}: 4 unknown config keys: 'n_gpu' (use torchrun",
            "'optimizer.args' (use optimizer.lr)")


def test_the_checker_refuses_what_training_refuses(tmp_path):
    rng = np.random.default_rng(0)
    items = [{"id": f"v{i}", "2d": rng.normal(size=(6, 8)).astype(np.float32), "caption_en": [f"a cat {i}"],
              "caption_de": [f"eine Katze {i}"]} for i in range(4)]
    items[3]["id"] = "v1"
    (tmp_path / "dup.pkl").write_bytes(pickle.dumps(items))
    refused(cli("-m", "data_loader.check", tmp_path / "dup.pkl"), "ids occur more than once: v1 x2",
            "--allow-duplicate-ids")
    items[3]["id"] = "v3"
    items[2]["caption_en"], items[2]["caption_de"] = [], []
    (tmp_path / "bare.pkl").write_bytes(pickle.dumps(items))
    from data_loader import check
    assert check.main([str(tmp_path / "bare.pkl")]) == 2


def test_an_unreachable_hub_id_fails_fast_in_one_line(toy_assets, tmp_path):
    config = toy_config(toy_assets, tmp_path, "translate-train", **{"model.text_encoder": "org/missing-encoder"})
    path = write_json_config(tmp_path, "hub", config)
    # An endpoint that refuses connections at once, and an empty cache: no download is tried for long.
    env = {"HF_ENDPOINT": "http://127.0.0.1:9", "HF_HOME": str(tmp_path / "hf_home")}
    refused(cli("train.py", "-c", path, "-d", "cpu", env=env),
            "'org/missing-encoder': not a local folder, not in the Hugging Face cache, and http://127.0.0.1:9 "
            "cannot be reached", "hf download org/missing-encoder --local-dir DIR")
    assert not list((tmp_path / "runs").rglob("latest.pt"))
