"""utils.results and utils.report: gathering Sacred run folders, mean ± sample std over seeds, refusing mixed groups."""
import csv
import json
import math
import statistics

import pytest

from utils import report, results

LANGS = ("en", "de", "fr")
# seed -> {lang: t2v R1}; the expected means and sample standard deviations are computed below
# by the statistics module, independently of the report's own arithmetic.
R1 = {0: {"en": 10.0, "de": 5.0, "fr": 4.0},
      1: {"en": 12.0, "de": 6.0, "fr": 4.5},
      2: {"en": 14.0, "de": 10.0, "fr": 5.5}}


def config(seed, name="c2kd", stage="c2kd", balance=0.5, save_dir="runs/x"):
    return {"name": name, "seed": seed, "stage": stage, "languages": list(LANGS),
            "data": {"train_path": "data/x/train.pkl", "num_workers": 4},
            "loss": {"balance": balance, "temperature": 0.1},
            "trainer": {"epochs": 3, "save_dir": save_dir}}


def metrics(r1, shift=0.0):
    out = {}
    for lang, v in r1.items():
        out[f"t2v_{lang}_R1"] = v + shift
        out[f"t2v_{lang}_R5"] = 2 * v + shift
        out[f"t2v_{lang}_MedR"] = 100 - v
    out["t2v_mean_R1"] = sum(r1.values()) / len(r1)
    return out


def write_run(folder, cfg, result, status="COMPLETED", series=None):
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(cfg))
    (folder / "run.json").write_text(json.dumps({"status": status, "result": result}))
    if series is not None:
        (folder / "metrics.json").write_text(json.dumps(
            {f"val.{k}": {"steps": list(range(1, len(v) + 1)), "values": v} for k, v in series.items()}))
    (folder / "_sources").mkdir()
    return folder


@pytest.fixture
def runs(tmp_path):
    root = tmp_path / "runs" / "c2kd"
    return [write_run(root / f"seed{s}", config(s), metrics(R1[s])) for s in R1]


def run_report(capsys, *args):
    code = report.main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_mean_and_sample_std(tmp_path, runs, capsys):
    out = tmp_path / "out"
    code, stdout, err = run_report(capsys, "--method", "C2KD=" + ",".join(map(str, runs)), "--recall", "1,5",
                                   "--out", out)
    assert code == 0, err
    rows = {(r["method"], r["metric"]): r for r in csv.DictReader((out / "table.csv").open())}
    row = rows[("C2KD", "t2v_R1")]
    assert row["n_runs"] == "3" and row["seeds"] == "0 1 2"
    for lang in LANGS:
        vals = [R1[s][lang] for s in R1]
        assert float(row[f"{lang}_mean"]) == pytest.approx(statistics.mean(vals))
        assert float(row[f"{lang}_std"]) == pytest.approx(statistics.stdev(vals))   # ddof = 1
    non_en = [statistics.mean([R1[s]["de"], R1[s]["fr"]]) for s in R1]
    every = [statistics.mean(R1[s].values()) for s in R1]
    assert float(row["avg_no_en_mean"]) == pytest.approx(statistics.mean(non_en))
    assert float(row["avg_no_en_std"]) == pytest.approx(statistics.stdev(non_en))
    assert float(row["avg_all_mean"]) == pytest.approx(statistics.mean(every))
    assert float(rows[("C2KD", "t2v_R5")]["en_mean"]) == pytest.approx(24.0)
    md = (out / "table.md").read_text()
    assert "| C2KD | 3 | 12.0 ± 2.0 | 7.0 ± 2.6 | 4.7 ± 0.8 |" in md
    assert "sample std (ddof=1)" in md and "### t2v R@5" in md
    assert md in stdout
    tex = (out / "table.tex").read_text()
    assert "C2KD & 3 & 12.0 $\\pm$ 2.0" in tex and "\\toprule" in tex
    assert (out / "r1_bars.png").read_bytes()[:4] == b"\x89PNG"


def test_positional_runs_group_by_config_and_label(tmp_path, runs, capsys):
    for s in (0, 1):
        write_run(tmp_path / "runs" / "tt" / f"seed{s}", config(s, name="translate_train", stage="translate-train"),
                  metrics(R1[s], 1.0))
    # a folder holding run folders is searched; the runs' own save_dir differs but does not count
    write_run(tmp_path / "runs" / "c2kd" / "seed3", config(3, save_dir="elsewhere"), metrics(R1[0]))
    code, stdout, err = run_report(capsys, tmp_path / "runs", "--out", tmp_path / "out")
    assert code == 0, err
    assert "| c2kd | 4 |" in stdout and "| translate_train | 2 | 12.0 ± 1.4 |" in stdout


def test_refuses_a_method_mixing_configs(tmp_path, runs, capsys):
    odd = write_run(tmp_path / "runs" / "c2kd_l01" / "seed3", config(3, balance=0.1), metrics(R1[0]))
    code, stdout, err = run_report(capsys, "--method", f"C2KD={runs[0]},{runs[1]},{odd}", "--out", tmp_path / "o")
    assert code == 2 and stdout == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "refusing to average method 'C2KD'" in lines[0] and "loss.balance" in lines[0]
    assert not (tmp_path / "o").exists()


def test_group_by_name_refuses_mixed_configs(tmp_path, runs, capsys):
    write_run(tmp_path / "runs" / "c2kd" / "seed7", config(7, balance=0.1), metrics(R1[0]))
    code, _, err = run_report(capsys, tmp_path / "runs", "--group-by-name", "--out", tmp_path / "o")
    assert code == 2 and "loss.balance" in err and len(err.strip().splitlines()) == 1
    # without --group-by-name the two configs become two rows, told apart by the differing key
    code, stdout, err = run_report(capsys, tmp_path / "runs", "--out", tmp_path / "o")
    assert code == 0 and "c2kd [loss.balance=0.5]" in stdout and "c2kd [loss.balance=0.1]" in stdout


def test_runs_of_two_config_files_with_the_same_seeds_are_two_rows(tmp_path, runs, capsys):
    for s in R1:  # the same settings under another config file's name
        write_run(tmp_path / "runs" / "copy" / f"seed{s}", config(s, name="c2kd_copy"), metrics(R1[s], 1.0))
    code, stdout, err = run_report(capsys, tmp_path / "runs", "--out", tmp_path / "o")
    assert code == 0, err
    assert "| c2kd | 3 | 12.0 ± 2.0 |" in stdout and "| c2kd_copy / c2kd | 3 | 13.0 ± 2.0 |" in stdout
    one = run_report(capsys, runs[0], "--out", tmp_path / "one")[1]
    assert "one run per method" in one and "±" not in one.split("Runs per method")[0]


def test_a_key_an_older_config_lacks_counts_at_what_older_runs_did(tmp_path, runs, capsys):
    """A run written before model.length_bucket_rows existed ran one bucket (its legacy value in config_keys.py), not
    today's default; a key without a legacy value counts at its default."""
    now = config(3)
    now["model"] = {"length_bucket_rows": 128}
    newer = write_run(tmp_path / "newer" / "seed3", now, metrics(R1[0]))
    code, _, err = run_report(capsys, "--method", f"C2KD={runs[0]},{newer}", "--out", tmp_path / "o")
    assert code == 2 and "model.length_bucket_rows = null" in err and "vs 128" in err
    explicit = config(4)
    explicit["model"] = {"length_bucket_rows": None, "depth": 2}  # model.depth's default
    same = write_run(tmp_path / "same" / "seed4", explicit, metrics(R1[1]))
    code, stdout, err = run_report(capsys, "--method", f"C2KD={runs[0]},{same}", "--out", tmp_path / "o")
    assert code == 0 and "| C2KD | 2 |" in stdout, err


def test_refuses_two_runs_with_one_seed(tmp_path, runs, capsys):
    again = write_run(tmp_path / "again" / "seed0", config(0), metrics(R1[1]))
    code, _, err = run_report(capsys, "--method", f"C2KD={runs[0]},{again}", "--out", tmp_path / "o")
    assert code == 2 and "two runs with seed 0" in err


def test_metrics_json_fallback_and_unfinished_runs(tmp_path, capsys):
    a = write_run(tmp_path / "r" / "seed0", config(0), None,
                  series={"t2v_en_R1": [1.0, 20.0], "t2v_de_R1": [1.0, 8.0]})
    b = write_run(tmp_path / "r" / "seed1", config(1), None, status="INTERRUPTED",
                  series={"t2v_en_R1": [2.0, 22.0], "t2v_de_R1": [3.0, 9.0]})
    code, stdout, err = run_report(capsys, "--method", f"M={a},{b}", "--out", tmp_path / "o")
    assert code == 0 and "| M | 1 | 20.0 | 8.0 |" in stdout and "status INTERRUPTED" in err
    code, stdout, _ = run_report(capsys, "--method", f"M={a},{b}", "--include-unfinished", "--out", tmp_path / "o")
    assert code == 0 and "| M | 2 | 21.0 ± 1.4 | 8.5 ± 0.7 |" in stdout and "epoch 2 of 3" in stdout


def test_mean_std_edge_cases():
    assert results.mean_std([3.0]) == (3.0, pytest.approx(math.nan, nan_ok=True))
    mean, std = results.mean_std([1.0, 2.0, 3.0, 4.0])
    assert mean == 2.5 and std == pytest.approx(statistics.stdev([1, 2, 3, 4]))


def test_useless_input_is_a_one_line_error(tmp_path, capsys):
    code, _, err = run_report(capsys, tmp_path / "nothing", "--out", tmp_path / "o")
    assert code == 2 and "no such run folder" in err
    (tmp_path / "empty").mkdir()
    code, _, err = run_report(capsys, tmp_path / "empty", "--out", tmp_path / "o")
    assert code == 2 and "holds no run folder" in err
    code, _, err = run_report(capsys, "--method", "nodirs", "--out", tmp_path / "o")
    assert code == 2 and "NAME=DIR" in err
    for recall in (",", "0,1"):
        code, _, err = run_report(capsys, tmp_path / "nothing", "--recall", recall, "--out", tmp_path / "o")
        assert code == 2 and err.strip() == f"error: --recall expects positive integers such as 1,5,10, got '{recall}'"


def test_an_unwritable_output_folder_is_a_one_line_error(tmp_path, runs, capsys):
    blocked = tmp_path / "a_file"
    blocked.write_text("not a folder")
    code, _, err = run_report(capsys, *runs, "--out", blocked / "report")
    assert code == 2 and err.strip() == f"error: {blocked / 'report'}: Not a directory"


def test_a_reranked_test_run_adds_labelled_rows_under_its_raw_row(tmp_path, capsys):
    result = {**metrics(R1[0]), **{f"dsl/{k}": v + 1.0 for k, v in metrics(R1[0]).items()},
              **{f"qbnorm/{k}": v + 2.0 for k, v in metrics(R1[0]).items() if k.startswith("t2v")}}
    write_run(tmp_path / "test_runs" / "1", config(0), result)
    code, out, _ = run_report(capsys, "--method", f"C2KD={tmp_path / 'test_runs' / '1'}", "--out", str(tmp_path / "rep"))
    assert code == 0
    rows = [line for line in out.splitlines() if line.startswith("| C2KD")]
    assert [row.split(" | ")[0] for row in rows] == [
        "| C2KD", "| C2KD + dsl (over all test queries)", "| C2KD + qbnorm (over a querybank of training captions)"]
    assert [row.split(" | ")[2] for row in rows] == ["10.0", "11.0", "12.0"]  # en R@1: raw, DSL, QB-Norm


# Per-seed differences of a second method (translate-train) from the C2KD runs of ``runs``.
SHIFT = {0: {"en": -1.0, "de": -2.0, "fr": -0.5}, 1: {"en": 0.5, "de": -1.5, "fr": -1.0},
         2: {"en": 0.0, "de": -3.0, "fr": 1.0}}


def test_paired_differences_against_a_baseline(tmp_path, runs, capsys):
    from scipy import stats
    base = [write_run(tmp_path / "runs" / "tt" / f"seed{s}", config(s, name="translate_train", stage="translate-train"),
                      metrics({lang: R1[s][lang] + SHIFT[s][lang] for lang in LANGS})) for s in R1]
    out = tmp_path / "out"
    code, stdout, err = run_report(capsys, "--method", "TT=" + ",".join(map(str, base)),
                                   "--method", "C2KD=" + ",".join(map(str, runs)), "--baseline", "TT", "--out", out)
    assert code == 0, err
    # C2KD minus TT on the non-English average, seed by seed; the interval and test from scipy directly.
    diffs = [-statistics.mean([SHIFT[s]["de"], SHIFT[s]["fr"]]) for s in R1]
    low, high = stats.t.interval(0.95, len(diffs) - 1, loc=statistics.mean(diffs),
                                 scale=statistics.stdev(diffs) / math.sqrt(len(diffs)))
    p = stats.ttest_rel([statistics.mean([R1[s]["de"], R1[s]["fr"]]) for s in R1],
                        [statistics.mean([R1[s][l] + SHIFT[s][l] for l in ("de", "fr")]) for s in R1]).pvalue
    rows = {(r["method"], r["column"]): r for r in csv.DictReader((out / "paired.csv").open())}
    row = rows[("C2KD", "avg_no_en")]
    assert row["baseline"] == "TT" and row["pairs"] == "3" and row["seeds"] == "0 1 2"
    assert float(row["mean"]) == pytest.approx(statistics.mean(diffs))
    assert (float(row["ci95_low"]), float(row["ci95_high"])) == (pytest.approx(low), pytest.approx(high))
    assert float(row["p_paired_t"]) == pytest.approx(p) and row["seeds_better"] == "3"
    assert float(rows[("C2KD", "en")]["mean"]) == pytest.approx(statistics.mean(-SHIFT[s]["en"] for s in R1))
    assert ("TT", "avg_no_en") not in rows  # the baseline is not compared with itself
    md = (out / "table.md").read_text()
    line = f"| C2KD | 3 | 3 of 3 | {statistics.mean(diffs):+.1f} | [{low:+.1f}, {high:+.1f}] | {p:.2g} |"
    assert line in md and "minus TT, paired by seed" in md and md in stdout
    assert f"[{low:+.1f}, {high:+.1f}]" in (out / "table.tex").read_text()
    assert (out / "paired_r1.png").read_bytes()[:4] == b"\x89PNG"
    # Only seeds both methods have are paired; a name that is no method is a one-line error.
    code, stdout, _ = run_report(capsys, "--method", f"TT={base[0]},{base[1]}", "--method",
                                 "C2KD=" + ",".join(map(str, runs)), "--baseline", "TT", "--out", out)
    assert code == 0 and "| C2KD | 2 | " in stdout
    code, _, err = run_report(capsys, "--method", "C2KD=" + ",".join(map(str, runs)), "--baseline", "tt",
                              "--out", out)
    assert code == 2 and err.strip() == "error: --baseline 'tt' is not a method of the report (they are: C2KD)"


def test_compare_pairs_only_the_named_methods_with_the_baseline(tmp_path, runs, capsys):
    base = [write_run(tmp_path / "tt" / f"seed{s}", config(s, name="translate_train", stage="translate-train"),
                      metrics(R1[s], shift=-1.0)) for s in R1]
    zero = [write_run(tmp_path / "zs" / f"seed{s}", config(s, name="zero_shot", stage="zero-shot"),
                      metrics(R1[s], shift=-9.0)) for s in R1]
    out = tmp_path / "out"
    methods = ["--method", "TT=" + ",".join(map(str, base)), "--method", "ZS=" + ",".join(map(str, zero)),
               "--method", "C2KD=" + ",".join(map(str, runs))]
    code, stdout, err = run_report(capsys, *methods, "--baseline", "TT", "--compare", "C2KD", "--out", out)
    assert code == 0, err
    paired_rows = {r["method"] for r in csv.DictReader((out / "paired.csv").open())}
    assert paired_rows == {"C2KD"}
    assert "| ZS | 3 |" in stdout and "| ZS | 3 | 0 of 3" not in stdout  # in the table, not paired
    code, _, err = run_report(capsys, *methods, "--baseline", "TT", "--compare", "zs", "--out", out)
    assert code == 2 and err.strip() == ("error: --compare 'zs' is not a method of the report "
                                         "(they are: TT, ZS, C2KD)")
    code, _, err = run_report(capsys, *methods, "--compare", "ZS", "--out", out)
    assert code == 2 and err.strip() == "error: --compare needs --baseline NAME: the method the others are paired with"


def test_learning_curves_from_the_per_epoch_validation_series(tmp_path, runs, capsys):
    curves = [write_run(tmp_path / "train" / f"seed{s}", config(s), metrics(R1[s]),
                        series={"t2v_en_R1": [5.0, 9.0, 10.0], "t2v_de_R1": [1.0, 4.0, 5.0 + s],
                                "t2v_fr_R1": [1.0, 3.0, 4.0]}) for s in (0, 1)]
    out = tmp_path / "out"
    code, stdout, err = run_report(capsys, *runs, "--curve", "C2KD=" + ",".join(map(str, curves)), "--out", out)
    assert code == 0 and "curves_r1.png" in stdout, err
    assert (out / "curves_r1.png").read_bytes()[:4] == b"\x89PNG"
    epochs, values = results.epoch_series(results.load_run(curves[1]), ["de", "fr"], "t2v", 1)
    assert epochs == [1, 2, 3] and values == [1.0, 3.5, 5.0]
    code, _, err = run_report(capsys, *runs, "--curve", f"C2KD={runs[0]}", "--out", out)
    assert code == 2 and "no per-epoch 'val.t2v_<lang>_R1' series for a learning curve" in err
