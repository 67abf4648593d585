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


def table(methods, languages, prefix, k):
    """{label: {column: Cell}} with one column per language plus 'avg_no_en' and 'avg_all'."""
    out = {}
    for m in methods:
        row = {}
        for lang in languages:
            vals = [r.metrics[f"{prefix}_{lang}_R{k}"] for r in m.runs if f"{prefix}_{lang}_R{k}" in r.metrics]
            row[lang] = Cell(*mean_std(vals), len(vals))
        for column, langs in (("avg_no_en", [l for l in languages if l != ENGLISH]), ("avg_all", languages)):
            per_run = []
            for r in m.runs:
                vals = [r.metrics[f"{prefix}_{lang}_R{k}"] for lang in langs if f"{prefix}_{lang}_R{k}" in r.metrics]
                if vals:
                    per_run.append(sum(vals) / len(vals))
            row[column] = Cell(*mean_std(per_run), len(per_run))
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


def markdown(methods, tables, languages, prefix, recalls, digits):
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
    lines.append("Runs per method:")
    lines.append("")
    for m in methods:
        seeds = ", ".join(str(r.seed) for r in m.runs)
        lines.append(f"- {m.label}: seeds {seeds}: " + ", ".join(str(r.path) for r in m.runs))
        for r in m.runs:
            if r.source != "result":
                lines.append(f"  - {r.path}: unfinished, numbers from {r.source}")
    return "\n".join(lines) + "\n"


def _tex(text):
    return re.sub(r"([&%$#_{}])", r"\\\1", str(text))


def latex(methods, tables, languages, prefix, recalls, digits):
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


def bar_chart(methods, rows, languages, prefix, k, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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

def build_methods(args):
    methods = []
    for text in args.method:
        name, dirs = parse_method(text)
        runs = load_runs(dirs, args.include_unfinished)
        check_group(name, runs)
        methods.append(Method(name, runs))
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
    out = Path(args.out)
    md = markdown(methods, tables, languages, args.metric_prefix, recalls, args.digits)
    k_chart = 1 if 1 in recalls else recalls[0]
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.md").write_text(md)
    (out / "table.tex").write_text(latex(methods, tables, languages, args.metric_prefix, recalls, args.digits))
    (out / "table.csv").write_text(csv_text(methods, tables, languages, args.metric_prefix, recalls))
    bar_chart(methods, tables[k_chart], languages, args.metric_prefix, k_chart, out / f"r{k_chart}_bars.png")
    print(md)
    print(f"wrote {out}/table.md, table.tex, table.csv, r{k_chart}_bars.png")


if __name__ == "__main__":
    sys.exit(main())
