"""Finished runs as result tables: reading Sacred run folders, grouping them into methods, the
mean ± sample std over seeds, and per-seed paired differences against a baseline.

A run is a Sacred run folder written by train.py or test.py (``config.json`` and ``run.json``). Its
numbers are ``run.json``'s ``result`` (the metrics of the last epoch), or, where that is missing,
the last value of every ``val.*`` series in ``metrics.json``. A config key missing from an older
run's ``config.json`` counts at what runs written before the key existed did
(parse_config.upgrade_saved_config). A directory that is not a run folder is searched for run
folders (``_sources`` and ``test_runs`` folders are skipped).

A method (a table row) never averages runs whose configs differ in anything but the seed and the
keys that cannot change results (IGNORED_KEYS). utils.report writes these tables out.
"""
import functools
import json
import math
import re
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

from common.errors import UserError
from config_keys import RESULT_NEUTRAL_KEYS
from data_loader.corpus import ENGLISH
from model.rerank import RERANKERS
from parse_config import config_differences, flatten_config, upgrade_saved_config, without_unused_keys

SUMMARY_ROWS = ("mean", f"mean_no_{ENGLISH}")
# Config keys never compared: those that change no result, and the seed, which a row averages over.
IGNORED_KEYS = RESULT_NEUTRAL_KEYS | {"seed"}
SKIP_DIRS = ("_sources", "test_runs")


class ReportError(UserError, ValueError):
    """A run cannot be used or runs cannot be grouped; the message says why, in one line."""


@dataclass
class Run:
    path: Path
    config: dict                 # flattened and upgraded (every key): {"loss.balance": 0.5, ...}
    metrics: dict                # {"t2v_de_R1": 23.1, ...}
    source: str = "result"

    @property
    def seed(self):
        return self.config["seed"]

    @property
    def name(self):
        return self.config["name"] or self.path.parent.name


@dataclass
class Method:
    label: str
    runs: list = field(default_factory=list)


# ---- reading runs --------------------------------------------------------------------------------

def read_json(path):
    try:
        return json.loads(path.read_text())
    except OSError as e:
        raise ReportError(f"{path}: cannot read ({e.strerror})") from None
    except json.JSONDecodeError as e:
        raise ReportError(f"{path}: not valid JSON (line {e.lineno}: {e.msg})") from None


def is_run_dir(path):
    return (path / "config.json").is_file() and (path / "run.json").is_file()


def find_run_dirs(path):
    path = Path(path)
    if is_run_dir(path):
        return [path]
    if not path.is_dir():
        raise ReportError(f"{path}: no such run folder")
    found = sorted((p.parent for p in path.rglob("run.json")
                    if is_run_dir(p.parent) and not any(part in SKIP_DIRS for part in p.parent.relative_to(path).parts)),
                   key=lambda p: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(p))])
    if not found:
        raise ReportError(f"{path}: holds no run folder (config.json + run.json)")
    return found


def load_run(path, include_unfinished=False):
    """The run in ``path``; None (with a note on stderr) for an unfinished run unless asked for. A key
    its config lacks counts at what runs written before the key existed did: that value is grouped
    and compared."""
    path = Path(path)
    config = upgrade_saved_config(flatten_config(read_json(path / "config.json")))
    info = read_json(path / "run.json")
    status = info.get("status", "UNKNOWN")
    if status != "COMPLETED" and not include_unfinished:
        print(f"note: skipping {path}: status {status} (pass --include-unfinished to use its last epoch)",
              file=sys.stderr)
        return None
    result = info.get("result")
    if isinstance(result, dict) and result:
        return Run(path, config, {k: float(v) for k, v in result.items() if isinstance(v, (int, float))})
    series = read_json(path / "metrics.json") if (path / "metrics.json").is_file() else {}
    metrics, last_step = {}, None
    for key, s in series.items():
        if key.startswith("val.") and s.get("values"):
            metrics[key[len("val."):]] = float(s["values"][-1])
            last_step = s["steps"][-1] if s.get("steps") else last_step
    if not metrics:
        print(f"note: skipping {path}: no result in run.json and no val.* series in metrics.json", file=sys.stderr)
        return None
    epochs = config["trainer.epochs"]
    return Run(path, config, metrics, source=f"metrics.json, epoch {last_step} of {epochs}")


def load_runs(paths, include_unfinished=False):
    runs, seen = [], set()
    for p in paths:
        for d in find_run_dirs(p):
            key = d.resolve()
            if key in seen:
                continue
            seen.add(key)
            run = load_run(d, include_unfinished)
            if run is not None:
                runs.append(run)
    return runs


# ---- grouping ------------------------------------------------------------------------------------

def comparable(config):
    return {k: v for k, v in without_unused_keys(config).items() if k not in IGNORED_KEYS}


def _short(value):
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


def config_difference(a, b):
    """'key = x (run a) vs y (run b)' for the first differing comparable key, or None."""
    differences = config_differences(a.config, b.config, ignore=IGNORED_KEYS)
    if not differences:
        return None
    key, x, y = differences[0]
    return f"{key} = {_short(x)} ({a.path}) vs {_short(y)} ({b.path})"


def check_group(label, runs):
    if not runs:
        raise ReportError(f"method '{label}': no finished runs")
    for other in runs[1:]:
        diff = config_difference(runs[0], other)
        if diff:
            raise ReportError(f"refusing to average method '{label}': its runs' configs differ in more than "
                              f"the seed: {diff}")
    seeds = {}
    for r in runs:
        if r.seed in seeds:
            raise ReportError(f"method '{label}' has two runs with seed {r.seed} ({seeds[r.seed].path} and "
                              f"{r.path}); pass each seed once")
        seeds[r.seed] = r


def default_label(run):
    stage = run.config["stage"]
    name = run.name
    return name if name.replace("_", "-") == stage else f"{name} / {stage}"


def group_runs(runs, by_name=False):
    """Positional runs grouped by name and config minus the seed (or by name alone); labels made
    unique. Runs of two config files never share a row, even when the files differ only in keys
    that change no result: their seeds would otherwise clash."""
    groups = {}
    for r in runs:
        key = r.name if by_name else json.dumps([r.name, comparable(r.config)], sort_keys=True, default=str)
        groups.setdefault(key, []).append(r)
    methods = [Method(default_label(rs[0]), rs) for rs in groups.values()]
    base = [m.label for m in methods]
    suffixes = []
    for i, m in enumerate(methods):
        mine = comparable(m.runs[0].config)
        others = [comparable(o.runs[0].config) for j, o in enumerate(methods) if j != i and base[j] == base[i]]
        keys = sorted({k for o in others for k in set(mine) | set(o) if mine.get(k) != o.get(k)})
        suffixes.append(" [" + ", ".join(f"{k}={_short(mine.get(k))}" for k in keys[:2]) + "]" if others else "")
    for m, suffix in zip(methods, suffixes):
        m.label += suffix
    return methods


def with_reranked_rows(methods):
    """Each method followed by one method per re-ranker its runs report (test.py's result keys
    ``<re-ranker>/<metric>``), holding those metrics under the plain names."""
    out = []
    for m in methods:
        out.append(m)
        for name, reranker in RERANKERS.items():
            prefix = f"{name}/"
            if all(any(k.startswith(prefix) for k in r.metrics) for r in m.runs):
                runs = [Run(r.path, r.config, {k[len(prefix):]: v for k, v in r.metrics.items() if k.startswith(prefix)},
                            r.source) for r in m.runs]
                out.append(Method(f"{m.label} + {name} (over {reranker.data})", runs))
    return out


def parse_method(text):
    if "=" not in text:
        raise ReportError(f"--method expects NAME=DIR[,DIR...], got '{text}'")
    name, dirs = text.split("=", 1)
    dirs = [d for d in dirs.split(",") if d.strip()]
    if not name.strip() or not dirs:
        raise ReportError(f"--method expects NAME=DIR[,DIR...], got '{text}'")
    return name.strip(), dirs


def named_methods(texts, include_unfinished):
    """One Method per ``NAME=DIR[,DIR...]`` text, its runs checked to differ only in the seed."""
    methods = []
    for text in texts:
        name, dirs = parse_method(text)
        runs = load_runs(dirs, include_unfinished)
        check_group(name, runs)
        methods.append(Method(name, runs))
    return methods


# ---- statistics ----------------------------------------------------------------------------------

def mean_std(values):
    """Mean and sample standard deviation (ddof=1; NaN for a single value)."""
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else math.nan


def languages_of(methods, prefix):
    pattern = re.compile(rf"^{re.escape(prefix)}_(.+)_R\d+$")
    found = []
    for m in methods:
        for r in m.runs:
            for key in r.metrics:
                hit = pattern.match(key)
                if hit and hit.group(1) not in SUMMARY_ROWS and hit.group(1) not in found:
                    found.append(hit.group(1))
    preferred = []
    for m in methods:
        preferred += [lang for lang in (m.runs[0].config["languages"] or []) if lang not in preferred]
    rest = sorted(lang for lang in found if lang not in preferred)
    order = [ENGLISH] + [lang for lang in preferred + rest if lang != ENGLISH]
    return [lang for lang in order if lang in found]


@dataclass
class Cell:
    mean: float
    std: float
    n: int


def columns_of(languages):
    return languages + ["avg_no_en", "avg_all"]


def run_value(run, column, languages, prefix, k):
    """One run's R@k in a column: a language, or the run's mean over the non-English languages
    ('avg_no_en') or over all of them ('avg_all'); None where the run has none of them."""
    langs = {"avg_no_en": [l for l in languages if l != ENGLISH], "avg_all": languages}.get(column, [column])
    vals = [run.metrics[f"{prefix}_{lang}_R{k}"] for lang in langs if f"{prefix}_{lang}_R{k}" in run.metrics]
    return sum(vals) / len(vals) if vals else None


def table(methods, languages, prefix, k):
    """{label: {column: Cell}} with one column per language plus 'avg_no_en' and 'avg_all'."""
    out = {}
    for m in methods:
        row = {}
        for column in columns_of(languages):
            vals = [v for v in (run_value(r, column, languages, prefix, k) for r in m.runs) if v is not None]
            row[column] = Cell(*mean_std(vals), len(vals))
        out[m.label] = row
    return out


@dataclass
class Paired:
    """Per-seed differences of a method minus the baseline, over the seeds both have."""
    diffs: list
    seeds: list

    @property
    def n(self):
        return len(self.diffs)

    @property
    def mean(self):
        return statistics.fmean(self.diffs) if self.diffs else math.nan

    @functools.cached_property
    def _t_test(self):
        """scipy's one-sample t-test of the differences against 0; None under two pairs or with no spread."""
        if self.n < 2 or statistics.pstdev(self.diffs) == 0:
            return None
        from scipy import stats
        return stats.ttest_1samp(self.diffs, 0.0)

    def interval(self, level=0.95):
        """Student-t confidence interval of the mean difference: NaN bounds under two pairs, the mean
        itself when every pair differs by the same amount."""
        if self.n < 2:
            return math.nan, math.nan
        test = self._t_test
        if test is None:
            return self.mean, self.mean
        bounds = test.confidence_interval(level)
        return float(bounds.low), float(bounds.high)

    @property
    def p_value(self):
        """Two-sided paired t-test of a zero mean difference (NaN under two pairs or with no spread)."""
        test = self._t_test
        return math.nan if test is None else float(test.pvalue)

    @property
    def wins(self):
        return sum(d > 0 for d in self.diffs)


def paired(methods, baseline, languages, prefix, k):
    """{label: {column: Paired}} for every method but ``baseline`` (a Method), paired by seed."""
    base = {r.seed: r for r in baseline.runs}
    out = {}
    for m in methods:
        if m is baseline:
            continue
        row = {}
        for column in columns_of(languages):
            diffs, seeds = [], []
            for r in m.runs:
                if r.seed not in base:
                    continue
                a, b = run_value(r, column, languages, prefix, k), run_value(base[r.seed], column, languages, prefix, k)
                if a is not None and b is not None:
                    diffs.append(a - b)
                    seeds.append(r.seed)
            row[column] = Paired(diffs, seeds)
        if row["avg_no_en"].n:  # a method without non-English results (an English teacher) is not compared
            out[m.label] = row
    return out


def epoch_series(run, languages, prefix, k):
    """(epochs, the run's per-epoch validation R@k averaged over ``languages``) from its metrics.json."""
    path = run.path / "metrics.json"
    series = read_json(path) if path.is_file() else {}
    found = [series[f"val.{prefix}_{lang}_R{k}"] for lang in languages if f"val.{prefix}_{lang}_R{k}" in series]
    if not found:
        raise ReportError(f"{path}: no per-epoch 'val.{prefix}_<lang>_R{k}' series for a learning curve")
    steps = found[0]["steps"]
    if any(s["steps"] != steps for s in found):
        raise ReportError(f"{path}: the languages' validation series cover different epochs")
    return steps, [statistics.fmean(v) for v in zip(*(s["values"] for s in found))]
