"""Paper-style result tables from finished runs: per-language R@K, mean ± std over seeds.

    python -m utils.report runs/msrvtt/clip/zero_shot runs/msrvtt/clip/translate_train runs/msrvtt/clip/c2kd
    python -m utils.report --method "Translate-train=runs/msrvtt/clip/translate_train" \\
                           --method "C2KD=runs/msrvtt/clip/c2kd/seed0,runs/msrvtt/clip/c2kd/seed1" \\
                           --recall 1,5,10 --out reports/msrvtt

A run is a Sacred run folder written by train.py (``config.json`` and ``run.json``). Its numbers
are ``run.json``'s ``result`` (the metrics of the last epoch), or, where that is missing, the last
value of every ``val.*`` series in ``metrics.json``. A config key missing from an older run's
``config.json`` counts at what runs written before the key existed did
(parse_config.upgrade_saved_config). A directory that is not a run folder is
searched for run folders (``_sources`` and ``test_runs`` folders are skipped).

Methods (table rows) are formed in one of three ways, and a row never averages runs whose
configs differ in anything but the seed (and the keys that cannot change results: IGNORED_KEYS):
* positional directories, grouped by their config name and config minus the seed (the default);
* positional directories grouped by config name (``--group-by-name``): a mixed group is refused;
* ``--method NAME=DIR[,DIR...]`` (repeatable): one row per option; a mixed group is refused.

A test.py run that re-ranked (``eval.rerank``) adds, right under its row, one row per re-ranker,
labelled with it and the data it used; its raw row is never left out.

Each cell is the mean ± the sample standard deviation (ddof=1) over the runs of the row; the
last two columns average each run over the non-English languages and over all languages first.
Writes table.md, table.tex, table.csv and a grouped bar chart of per-language R@1 (r1_bars.png)
to --out (default: reports/) and prints the Markdown.

``--baseline NAME`` says whether a difference is real: each other method minus the baseline, seed
by seed over the seeds both have, with the mean difference, its 95% Student-t interval and the
paired t-test (scipy.stats), in table.md, table.tex, paired.csv and a plot (paired_r1.png).
``--curve NAME=DIR[,DIR...]`` draws learning curves (curves_r1.png) from training runs: the
validation R@K of every epoch (their ``val.*`` series in metrics.json), averaged over the
non-English languages and over the runs.
"""
import argparse
import csv
import io
import json
import math
import re
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

from config_keys import RESULT_NEUTRAL_KEYS
from data_loader.corpus import ENGLISH
from model.rerank import RERANKERS
from parse_config import config_differences, flatten_config, upgrade_saved_config
from common.errors import UserError, run_command

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

def _read_json(path):
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
    config = upgrade_saved_config(flatten_config(_read_json(path / "config.json")))
    info = _read_json(path / "run.json")
    status = info.get("status", "UNKNOWN")
    if status != "COMPLETED" and not include_unfinished:
        print(f"note: skipping {path}: status {status} (pass --include-unfinished to use its last epoch)",
              file=sys.stderr)
        return None
    result = info.get("result")
    if isinstance(result, dict) and result:
        return Run(path, config, {k: float(v) for k, v in result.items() if isinstance(v, (int, float))})
    series = _read_json(path / "metrics.json") if (path / "metrics.json").is_file() else {}
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
    return {k: v for k, v in config.items() if k not in IGNORED_KEYS}


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

    def interval(self, level=0.95):
        """Student-t confidence interval of the mean difference (NaN bounds under two pairs)."""
        if self.n < 2:
            return math.nan, math.nan
        from scipy import stats
        half = stats.t.ppf(0.5 + level / 2, self.n - 1) * statistics.stdev(self.diffs) / math.sqrt(self.n)
        return self.mean - half, self.mean + half

    @property
    def p_value(self):
        """Two-sided paired t-test of a zero mean difference (NaN under two pairs or with no spread)."""
        if self.n < 2 or statistics.pstdev(self.diffs) == 0:
            return math.nan
        from scipy import stats
        return float(stats.ttest_1samp(self.diffs, 0.0).pvalue)

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


# ---- output --------------------------------------------------------------------------------------

COLUMN_TITLES = {"avg_no_en": "avg (no en)", "avg_all": "avg (all)"}


def fmt(cell, digits, pm="±", group_n=None):
    if cell.n == 0 or math.isnan(cell.mean):
        return "–"
    text = f"{cell.mean:.{digits}f}"
    if not math.isnan(cell.std):
        text += f" {pm} {cell.std:.{digits}f}"
    if group_n is not None and cell.n != group_n:
        text += f" (n={cell.n})"
    return text


def spread_text(methods):
    """What a cell holds: a mean ± sample std needs two seeds; with one run per method it is that run."""
    if all(len(m.runs) == 1 for m in methods):
        return "one run per method"
    return "mean ± sample std (ddof=1) over seeds"


def markdown(methods, tables, languages, prefix, recalls, digits, paired_tables=None, baseline=None):
    cols = languages + ["avg_no_en", "avg_all"]
    lines = []
    for k in recalls:
        rows = tables[k]
        lines.append(f"### {prefix} R@{k}: {spread_text(methods)}")
        lines.append("")
        lines.append("| method | n | " + " | ".join(COLUMN_TITLES.get(c, c) for c in cols) + " |")
        lines.append("|---|---:|" + "---:|" * len(cols))
        for m in methods:
            n = len(m.runs)
            lines.append(f"| {m.label} | {n} | " + " | ".join(fmt(rows[m.label][c], digits, group_n=n) for c in cols) + " |")
        lines.append("")
    if paired_tables:
        lines += paired_markdown(paired_tables, baseline, prefix, digits)
    lines.append("Runs per method:")
    lines.append("")
    for m in methods:
        seeds = ", ".join(str(r.seed) for r in m.runs)
        lines.append(f"- {m.label}: seeds {seeds}: " + ", ".join(str(r.path) for r in m.runs))
        for r in m.runs:
            if r.source != "result":
                lines.append(f"  - {r.path}: unfinished, numbers from {r.source}")
    return "\n".join(lines) + "\n"


PAIRED_COLUMNS = ("avg_no_en", "avg_all", ENGLISH)
CONFIDENCE = 0.95


def _signed(x, digits):
    return "–" if math.isnan(x) else f"{x:+.{digits}f}"


def _interval_text(p, digits):
    low, high = p.interval(CONFIDENCE)
    return "–" if math.isnan(low) else f"[{low:+.{digits}f}, {high:+.{digits}f}]"


def _p_text(p):
    return "–" if math.isnan(p.p_value) else f"{p.p_value:.2g}"


def paired_markdown(paired_tables, baseline, prefix, digits):
    """One table per R@k: each method minus the baseline, paired by seed, on the averages and English."""
    lines = []
    for k, rows in paired_tables.items():
        lines.append(f"### {prefix} R@{k} minus {baseline}, paired by seed: mean difference, "
                     f"{CONFIDENCE:.0%} t interval, paired t-test")
        lines.append("")
        lines.append("| method | pairs | seeds better (avg no en) | " + " | ".join(
            f"Δ {COLUMN_TITLES.get(c, c)} | {CONFIDENCE:.0%} CI | p" for c in PAIRED_COLUMNS) + " |")
        lines.append("|---|---:|---:|" + "---:|---:|---:|" * len(PAIRED_COLUMNS))
        for label, row in rows.items():
            main = row["avg_no_en"]
            cells = [f"{_signed(row[c].mean, digits)} | {_interval_text(row[c], digits)} | {_p_text(row[c])}"
                     for c in PAIRED_COLUMNS]
            lines.append(f"| {label} | {main.n} | {main.wins} of {main.n} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def _tex(text):
    return re.sub(r"([&%$#_{}])", r"\\\1", str(text))


def latex(methods, tables, languages, prefix, recalls, digits, paired_tables=None, baseline=None):
    cols = languages + ["avg_no_en", "avg_all"]
    parts = ["% Generated by utils.report; needs \\usepackage{booktabs}.",
             "% Cells: mean $\\pm$ sample standard deviation (ddof=1) over seeds; n = number of runs."]
    for k in recalls:
        rows = tables[k]
        parts.append(f"% {prefix} R@{k}")
        parts.append("\\begin{tabular}{lr" + "r" * len(cols) + "}")
        parts.append("\\toprule")
        parts.append("Method & $n$ & " + " & ".join(_tex(COLUMN_TITLES.get(c, c)) for c in cols) + " \\\\")
        parts.append("\\midrule")
        for m in methods:
            n = len(m.runs)
            cells = [fmt(rows[m.label][c], digits, pm="$\\pm$", group_n=n).replace("–", "--") for c in cols]
            parts.append(f"{_tex(m.label)} & {n} & " + " & ".join(cells) + " \\\\")
        parts.append("\\bottomrule")
        parts.append("\\end{tabular}")
        parts.append("")
    for k, rows in (paired_tables or {}).items():
        parts.append(f"% {prefix} R@{k} minus {baseline}, paired by seed: mean difference, "
                     f"{CONFIDENCE:.0%} t interval, paired t-test p")
        parts.append("\\begin{tabular}{lr" + "rrr" * len(PAIRED_COLUMNS) + "}")
        parts.append("\\toprule")
        parts.append("Method & pairs & " + " & ".join(
            f"$\\Delta$ {_tex(COLUMN_TITLES.get(c, c))} & CI & $p$" for c in PAIRED_COLUMNS) + " \\\\")
        parts.append("\\midrule")
        for label, row in rows.items():
            cells = [f"{_signed(row[c].mean, digits)} & {_interval_text(row[c], digits)} & {_p_text(row[c])}"
                     .replace("–", "--") for c in PAIRED_COLUMNS]
            parts.append(f"{_tex(label)} & {row['avg_no_en'].n} & " + " & ".join(cells) + " \\\\")
        parts.append("\\bottomrule")
        parts.append("\\end{tabular}")
        parts.append("")
    return "\n".join(parts)


def csv_text(methods, tables, languages, prefix, recalls):
    cols = languages + ["avg_no_en", "avg_all"]
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["method", "metric", "n_runs", "seeds"] + [f"{c}_{s}" for c in cols for s in ("mean", "std", "n")])
    for k in recalls:
        for m in methods:
            row = [m.label, f"{prefix}_R{k}", len(m.runs), " ".join(str(r.seed) for r in m.runs)]
            for c in cols:
                cell = tables[k][m.label][c]
                row += ["" if math.isnan(cell.mean) else round(cell.mean, 6),
                        "" if math.isnan(cell.std) else round(cell.std, 6), cell.n]
            w.writerow(row)
    return buf.getvalue()


def paired_csv_text(paired_tables, baseline, prefix):
    """One row per (R@k, method, column): the per-seed differences against the baseline and their summary."""
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["metric", "method", "baseline", "column", "pairs", "seeds", "differences", "mean",
                f"ci{CONFIDENCE:.0%}_low".replace("%", ""), f"ci{CONFIDENCE:.0%}_high".replace("%", ""),
                "p_paired_t", "seeds_better"])
    for k, rows in paired_tables.items():
        for label, row in rows.items():
            for column, p in row.items():
                low, high = p.interval(CONFIDENCE)
                w.writerow([f"{prefix}_R{k}", label, baseline, column, p.n, " ".join(map(str, p.seeds)),
                            " ".join(f"{d:.6g}" for d in p.diffs)]
                           + ["" if math.isnan(x) else x for x in (p.mean, low, high, p.p_value)]
                           + [p.wins])
    return buf.getvalue()


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def paired_chart(rows, baseline, prefix, k, path):
    """Per-seed differences against the baseline (dots) with their mean and confidence interval, on
    the non-English average."""
    plt = _pyplot()
    labels = list(rows)
    fig, ax = plt.subplots(figsize=(max(5.0, 1.2 + 1.3 * len(labels)), 3.6))
    ax.axhline(0.0, color="grey", linewidth=0.8)
    for i, label in enumerate(labels):
        p = rows[label]["avg_no_en"]
        ax.scatter([i] * p.n, p.diffs, s=14, color="tab:blue", alpha=0.6, zorder=3)
        low, high = p.interval(CONFIDENCE)
        if not math.isnan(low):
            ax.errorbar([i], [p.mean], yerr=[[p.mean - low], [high - p.mean]], fmt="o", color="black", capsize=4)
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, rotation=20, ha="right", fontsize="small")
    ax.set_ylabel(f"Δ {prefix} R@{k}, avg (no en)")
    ax.set_title(f"minus {baseline}, paired by seed: seeds (dots), mean and {CONFIDENCE:.0%} t interval")
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)


def epoch_series(run, languages, prefix, k):
    """(epochs, the run's per-epoch validation R@k averaged over ``languages``) from its metrics.json."""
    path = run.path / "metrics.json"
    series = _read_json(path) if path.is_file() else {}
    found = [series[f"val.{prefix}_{lang}_R{k}"] for lang in languages if f"val.{prefix}_{lang}_R{k}" in series]
    if not found:
        raise ReportError(f"{path}: no per-epoch 'val.{prefix}_<lang>_R{k}' series for a learning curve")
    steps = found[0]["steps"]
    if any(s["steps"] != steps for s in found):
        raise ReportError(f"{path}: the languages' validation series cover different epochs")
    return steps, [statistics.fmean(v) for v in zip(*(s["values"] for s in found))]


def curve_chart(curves, prefix, k, path):
    """Validation R@k per epoch (mean over the non-English languages), mean over each method's runs
    with their range shaded."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for m in curves:
        languages = [l for l in languages_of([m], prefix) if l != ENGLISH] or [ENGLISH]
        per_run = [epoch_series(r, languages, prefix, k) for r in m.runs]
        epochs = min((steps for steps, _ in per_run), key=len)
        values = [v[:len(epochs)] for _, v in per_run]
        mean = [statistics.fmean(col) for col in zip(*values)]
        line = ax.plot(epochs, mean, label=f"{m.label} ({len(values)} runs)")[0]
        ax.fill_between(epochs, [min(c) for c in zip(*values)], [max(c) for c in zip(*values)],
                        color=line.get_color(), alpha=0.2)
    ax.set_xlabel("epoch")
    ax.set_ylabel(f"validation {prefix} R@{k}, avg (no en) (%)")
    ax.set_title("learning curves: mean over runs, range shaded")
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)


def bar_chart(methods, rows, languages, prefix, k, path):
    plt = _pyplot()
    width = 0.8 / max(1, len(methods))
    fig, ax = plt.subplots(figsize=(min(14.0, max(6.0, 1.5 + 0.6 * len(languages) * (0.5 + 0.25 * len(methods)))), 4))
    for j, m in enumerate(methods):
        means = [rows[m.label][lang].mean for lang in languages]
        stds = [0.0 if math.isnan(rows[m.label][lang].std) else rows[m.label][lang].std for lang in languages]
        xs = [i + (j - (len(methods) - 1) / 2) * width for i in range(len(languages))]
        drawn = [i for i, v in enumerate(means) if not math.isnan(v)]  # a language the method lacks: no bar
        ax.bar([xs[i] for i in drawn], [means[i] for i in drawn], width, yerr=[stds[i] for i in drawn], capsize=2,
               label=m.label)
    ax.set_xticks(range(len(languages)))
    ax.set_xticklabels(languages)
    ax.set_ylim(bottom=0)
    ax.set_ylabel(f"{prefix} R@{k} (%)")
    ax.set_title(f"{prefix} R@{k} per language ({spread_text(methods)})")
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)


# ---- entry point ---------------------------------------------------------------------------------

def named_methods(texts, include_unfinished):
    """One Method per ``NAME=DIR[,DIR...]`` text, its runs checked to differ only in the seed."""
    methods = []
    for text in texts:
        name, dirs = parse_method(text)
        runs = load_runs(dirs, include_unfinished)
        check_group(name, runs)
        methods.append(Method(name, runs))
    return methods


def build_methods(args):
    methods = named_methods(args.method, args.include_unfinished)
    if args.run_dirs:
        runs = load_runs(args.run_dirs, args.include_unfinished)
        if not runs:
            raise ReportError("no finished runs in " + ", ".join(args.run_dirs))
        grouped = group_runs(runs, by_name=args.group_by_name)
        for m in grouped:
            check_group(m.label, m.runs)
        methods += grouped
    if not methods:
        raise ReportError("nothing to report: pass run folders or --method NAME=DIR[,DIR...]")
    methods = with_reranked_rows(methods)
    labels = [m.label for m in methods]
    dup = next((l for l in labels if labels.count(l) > 1), None)
    if dup:
        raise ReportError(f"two methods are labelled '{dup}'; give them different --method names")
    return methods


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("run_dirs", nargs="*", help="run folders, or folders to search for run folders")
    parser.add_argument("--method", action="append", default=[], metavar="NAME=DIR[,DIR...]",
                        help="one table row from these runs (repeatable); refused if their configs differ")
    parser.add_argument("--group-by-name", action="store_true",
                        help="group positional runs by config name (refused if a group mixes configs)")
    parser.add_argument("--out", default="reports", help="output folder (default: reports)")
    parser.add_argument("--recall", default="1", help="comma-separated K of R@K, e.g. 1,5,10 (default: 1)")
    parser.add_argument("--metric-prefix", default="t2v", help="t2v (default) or v2t")
    parser.add_argument("--languages", help="comma-separated columns, in order (default: all, English first)")
    parser.add_argument("--digits", type=int, default=1, help="decimals in the tables (default 1)")
    parser.add_argument("--include-unfinished", action="store_true",
                        help="also use runs that did not complete (their last logged epoch)")
    parser.add_argument("--baseline", metavar="NAME",
                        help="a method's label: every other method's per-seed differences against it, with their "
                             "mean, 95%% t interval and paired t-test (paired.csv, paired_r<K>.png)")
    parser.add_argument("--curve", action="append", default=[], metavar="NAME=DIR[,DIR...]",
                        help="training runs whose per-epoch validation R@K (non-English average) is drawn as one "
                             "learning curve, mean over the runs (repeatable; curves_r<K>.png)")
    args = parser.parse_args(argv)
    return run_command(lambda: report(args))


def report(args):
    try:
        recalls = [int(k) for k in args.recall.split(",") if k.strip()]
    except ValueError:
        raise ReportError(f"--recall expects integers such as 1,5,10, got '{args.recall}'") from None
    if not recalls or min(recalls) < 1:
        raise ReportError(f"--recall expects positive integers such as 1,5,10, got '{args.recall}'")
    methods = build_methods(args)
    languages = args.languages.split(",") if args.languages else languages_of(methods, args.metric_prefix)
    if not languages:
        raise ReportError(f"the runs hold no '{args.metric_prefix}_<lang>_R<K>' metrics")
    tables = {k: table(methods, languages, args.metric_prefix, k) for k in recalls}
    for k in recalls:
        if all(c.n == 0 for row in tables[k].values() for c in row.values()):
            raise ReportError(f"the runs hold no '{args.metric_prefix}_<lang>_R{k}' metrics")
    paired_tables = {}
    if args.baseline is not None:
        baseline = next((m for m in methods if m.label == args.baseline), None)
        if baseline is None:
            raise ReportError(f"--baseline '{args.baseline}' is not a method of the report (they are: "
                              f"{', '.join(m.label for m in methods)})")
        paired_tables = {k: paired(methods, baseline, languages, args.metric_prefix, k) for k in recalls}
    curves = named_methods(args.curve, include_unfinished=True)
    out = Path(args.out)
    md = markdown(methods, tables, languages, args.metric_prefix, recalls, args.digits, paired_tables, args.baseline)
    k_chart = 1 if 1 in recalls else recalls[0]
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.md").write_text(md)
    (out / "table.tex").write_text(latex(methods, tables, languages, args.metric_prefix, recalls, args.digits,
                                         paired_tables, args.baseline))
    (out / "table.csv").write_text(csv_text(methods, tables, languages, args.metric_prefix, recalls))
    written = ["table.md", "table.tex", "table.csv", f"r{k_chart}_bars.png"]
    bar_chart(methods, tables[k_chart], languages, args.metric_prefix, k_chart, out / written[-1])
    if paired_tables:
        (out / "paired.csv").write_text(paired_csv_text(paired_tables, args.baseline, args.metric_prefix))
        written += ["paired.csv", f"paired_r{k_chart}.png"]
        paired_chart(paired_tables[k_chart], args.baseline, args.metric_prefix, k_chart, out / written[-1])
    if curves:
        written.append(f"curves_r{k_chart}.png")
        curve_chart(curves, args.metric_prefix, k_chart, out / written[-1])
    print(md)
    print(f"wrote {out}/" + ", ".join(written))


if __name__ == "__main__":
    sys.exit(main())
