"""Train, resume and evaluate on a small Multi-Toy through the real entry points."""
import json
from pathlib import Path

import numpy as np
import pytest

import test as test_entry
import train as train_entry
from tests.conftest import assert_same_weights, sacred_scalars, toy_config, write_json_config
from trainer.evaluate import flat_metrics, metric_names
from common.checkpoint import load_checkpoint


EPOCHS = 6


def run_train(config, run_id, *extra):
    code = train_entry.main(["-c", str(config), "--run-id", run_id, "-d", "cpu", *extra])
    assert code == 0
    return Path(json.loads(Path(config).read_text())["trainer"]["save_dir"]) / Path(config).stem / run_id


@pytest.fixture(scope="module")
def trained(tmp_path_factory, toy_assets):
    """One uninterrupted translate-train run, and one stopped after 2 epochs then resumed."""
    tmp = tmp_path_factory.mktemp("e2e")
    path = write_json_config(tmp, "tt", toy_config(toy_assets, tmp, **{"trainer.epochs": EPOCHS, "trainer.monitor": "t2v_mean_R1"}))
    full = run_train(path, "full")
    part = run_train(path, "part", "--epochs", "2")
    resumed = run_train(path, "resumed", "-r", str(part / "latest.pt"), "--epochs", str(EPOCHS))
    return {"config": path, "full": full, "part": part, "resumed": resumed}


def test_training_records_the_run_and_the_loss_falls(trained):
    run = trained["full"]
    losses = sacred_scalars(run, "train.epoch_loss")
    assert len(losses) == EPOCHS and losses[-1] < losses[0], losses
    saved = json.loads((run / "config.json").read_text())
    assert saved["stage"] == "translate-train" and saved["trainer"]["epochs"] == EPOCHS and saved["seed"] == 0
    record = json.loads((run / "run.json").read_text())
    assert record["status"] == "COMPLETED"
    # What produced the numbers: the project's modules and the versions of the packages that matter.
    import importlib.metadata
    for package in ("torch", "transformers", "tokenizers"):
        assert f"{package}=={importlib.metadata.version(package)}" in record["experiment"]["dependencies"]
    sources = {path for path, _ in record["experiment"]["sources"]}
    assert {"trainer/trainer.py", "model/loss.py", "model/metric.py", "data_loader/dataset.py"} <= sources
    assert (run / "latest.pt").is_file() and (run / "best.pt").is_file()
    state = load_checkpoint(run / "latest.pt")
    assert state["epoch"] == EPOCHS and state["step"] == EPOCHS * (128 // 16)
    assert state["config"]["data"]["batch_size"] == 16
    r10 = sacred_scalars(run, "val.t2v_mean_R10")
    assert len(r10) == EPOCHS and r10[-1] > 1.5 * 1000 / 48, r10  # well above chance (R@10 = 20.8) on 48 videos


def test_resume_reproduces_the_uninterrupted_run_exactly(trained):
    full = load_checkpoint(trained["full"] / "latest.pt")
    resumed = load_checkpoint(trained["resumed"] / "latest.pt")
    assert resumed["epoch"] == EPOCHS and resumed["step"] == full["step"]
    assert_same_weights(trained["full"] / "latest.pt", trained["resumed"] / "latest.pt")
    assert sacred_scalars(trained["full"], "val.t2v_mean_R1")[-1] == \
        sacred_scalars(trained["resumed"], "val.t2v_mean_R1")[-1]


def test_test_py_reproduces_training_metrics_and_saves_similarities(trained, tmp_path):
    run = trained["full"]
    out, sims = tmp_path / "eval", tmp_path / "sims"
    assert test_entry.main(["-r", str(run / "latest.pt"), "--out", str(out), "--save-sims", str(sims)]) == 0
    record = json.loads((out / "metrics.json").read_text())
    assert record["epoch"] == EPOCHS
    for lang in ("en", "de", "sw"):
        assert record["metrics"][lang]["t2v"]["R1"] == sacred_scalars(run, f"val.t2v_{lang}_R1")[-1]
        assert set(record["metrics"][lang]) == {"t2v", "v2t"}
    assert set(record["metrics"]["mean"]["t2v"]) >= {"R1", "R5", "R10", "R50", "MedR", "MeanR"}
    # The names trainer.monitor is checked against before training are those evaluation gives.
    languages = [lang for lang in record["metrics"] if not lang.startswith("mean")]
    assert sorted(flat_metrics(record["metrics"])) == sorted(metric_names(languages))
    matrix = np.load(sims / "de.npy")
    ids = json.loads((sims / "de.json").read_text())
    assert matrix.shape == (48, 48) and len(ids["query_ids"]) == 48 and ids["video_ids"][0] == ids["query_ids"][0]


def test_evaluation_batch_size_changes_only_float_rounding(trained, tmp_path):
    """Fixed-length padding and one ranking over the whole set: the batch size changes the
    embeddings only by float32 rounding (different matmul shapes), which can flip a near tie."""
    run = trained["full"]
    records, sims = [], []
    for bs in (7, 48):
        out = tmp_path / f"bs{bs}"
        assert test_entry.main(["-r", str(run / "latest.pt"), "--out", str(out), "--save-sims", str(out / "sims"),
                                "--set", f"data.eval_batch_size={bs}"]) == 0
        records.append(json.loads((out / "metrics.json").read_text())["metrics"])
        sims.append({f.stem: np.load(f) for f in (out / "sims").glob("*.npy")})
    assert len(sims[0]) == 9
    for lang, matrix in sims[0].items():
        np.testing.assert_allclose(sims[1][lang], matrix, atol=1e-5, rtol=0)
    one_query = 100 / 48
    for lang in records[0]:
        for direction in ("t2v", "v2t"):
            for stat, value in records[0][lang][direction].items():
                tolerance = 1.0 if stat in ("MedR", "MeanR") else one_query
                assert records[1][lang][direction][stat] == pytest.approx(value, abs=tolerance + 1e-9), (lang, stat)


def test_wrong_feature_dim_and_missing_language_are_one_line_errors(trained, capsys):
    code = train_entry.main(["-c", str(trained["config"]), "--set", "data.feature_dim=1024"])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("feature '2d' has dimension 512, but config key 'data.feature_dim' is 1024")
    assert "\n" not in err
    code = train_entry.main(["-c", str(trained["config"]), "--set", 'languages=["en","ja"]'])
    assert code == 2
    assert "no captions for language(s) ja" in capsys.readouterr().err


def test_training_needs_english_but_evaluation_ranks_any_languages(trained, tmp_path, capsys):
    code = train_entry.main(["-c", str(trained["config"]), "--set", 'languages=["de","fr"]'])
    assert code == 2
    assert capsys.readouterr().err.strip() == ("error: config key 'languages' must include 'en', the pivot language "
                                               "of every stage (it lists de, fr)")
    out = tmp_path / "eval"
    code = test_entry.main(["-r", str(trained["full"] / "latest.pt"), "--set", 'languages=["de","fr"]',
                            "--out", str(out)])
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())["metrics"]
    assert sorted(metrics) == ["de", "fr", "mean"]
    assert metrics["mean"]["t2v"]["R1"] == pytest.approx((metrics["de"]["t2v"]["R1"] + metrics["fr"]["t2v"]["R1"]) / 2)


def test_test_py_reranks_beside_the_raw_numbers_and_offline_from_saved_files(trained, tmp_path, capsys):
    from utils import rerank as offline
    run = trained["full"]
    out, sims = tmp_path / "eval", tmp_path / "sims"
    capsys.readouterr()
    assert test_entry.main(["-r", str(run / "latest.pt"), "--out", str(out), "--save-sims", str(sims),
                            "--rerank", "dsl,qbnorm", "--set", "eval.rerank_qbnorm_bank_size=64"]) == 0
    printed = capsys.readouterr().out
    record = json.loads((out / "metrics.json").read_text())
    assert record["eval"]["rerank"] == ["dsl", "qbnorm"]
    dsl, qb = record["reranked"]["dsl"], record["reranked"]["qbnorm"]
    assert dsl["label"] == "DSL (T=0.01, softmax over all test queries)"
    assert qb["label"] == "QB-Norm (beta=20, bank of 64 training captions in the query's language; t2v only)"
    # Each table row holds the raw numbers first, then each re-ranked variant, under its label.
    t2v_header = next(line for line in printed.splitlines() if line.startswith("raw"))
    assert t2v_header.index("raw") < t2v_header.index(dsl["label"]) < t2v_header.index(qb["label"])
    raw_de = next(line for line in printed.splitlines() if line.startswith("de "))
    assert raw_de.split()[1] == f"{record['metrics']['de']['t2v']['R1']:.1f}"
    assert set(qb["metrics"]["de"]) == {"t2v"} and set(dsl["metrics"]["de"]) == {"t2v", "v2t"}
    # The raw numbers are those of a run without re-ranking.
    assert record["metrics"]["de"]["t2v"]["R1"] == sacred_scalars(run, "val.t2v_de_R1")[-1]
    # On Multi-Toy both re-rankers move the mean R@1 in the direction the papers report.
    raw_r1 = record["metrics"]["mean"]["t2v"]["R1"]
    assert dsl["metrics"]["mean"]["t2v"]["R1"] > raw_r1 and qb["metrics"]["mean"]["t2v"]["R1"] > raw_r1
    # Offline, from the saved files, the same numbers.
    assert (sims / "de.querybank.npy").is_file() and np.load(sims / "de.querybank.npy").shape == (64, 48)
    assert offline.main([str(sims), "--out", str(tmp_path / "offline.json")]) == 0
    again = json.loads((tmp_path / "offline.json").read_text())["metrics"]
    for label, summary in ((dsl["label"], dsl["metrics"]), (qb["label"], qb["metrics"]), ("raw", record["metrics"])):
        for direction in summary["de"]:
            assert again[label]["de"][direction] == pytest.approx(summary["de"][direction])
