"""Paper-style result tables from finished runs: per-language R@K, mean ± std over seeds.

    python -m utils.report runs/msrvtt/clip/zero_shot runs/msrvtt/clip/translate_train runs/msrvtt/clip/c2kd
    python -m utils.report --method "Translate-train=runs/msrvtt/clip/translate_train" \\
                           --method "C2KD=runs/msrvtt/clip/c2kd/seed0,runs/msrvtt/clip/c2kd/seed1" \\
                           --recall 1,5,10 --out reports/msrvtt

Runs are Sacred run folders; utils.results says which numbers of a run are read. Methods (table
rows) are formed in one of three ways, and a row never averages runs whose configs differ in
anything but the seed (and the keys that cannot change results):
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
paired t-test (scipy.stats), in table.md, table.tex, paired.csv and a plot (paired_r1.png);
``--compare NAME`` (repeatable) pairs only the methods named.
``--curve NAME=DIR[,DIR...]`` draws learning curves (curves_r1.png) from training runs: the
validation R@K of every epoch (their ``val.*`` series in metrics.json), averaged over the
non-English languages and over the runs.
"""
import argparse
import csv
import io
import math
import re
import statistics
import sys
from pathlib import Path

from common.errors import run_command
from data_loader.corpus import ENGLISH
from utils.results import (ReportError, check_group, columns_of, epoch_series, group_runs, languages_of, load_runs,
                           named_methods, paired, table, with_reranked_rows)

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
    cols = columns_of(languages)
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
    cols = columns_of(languages)
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
    cols = columns_of(languages)
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


def _save(fig, path, legend_of=None):
    """Write and close the figure; ``legend_of``'s legend stands beside those axes, where it hides
    no bar or curve, and the image is widened to hold it."""
    if legend_of is None:
        fig.tight_layout()
        fig.savefig(path, dpi=150)
    else:  # tight_layout would shrink the axes to make room for the legend: widen the image instead
        legend = legend_of.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
        fig.savefig(path, dpi=150, bbox_inches="tight", bbox_extra_artists=[legend])
    _pyplot().close(fig)


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
    ax.set_title(f"minus {baseline}, paired by seed\nseeds (dots), mean and {CONFIDENCE:.0%} t interval",
                 fontsize="medium")
    _save(fig, path)


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
    _save(fig, path, legend_of=ax)


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
    _save(fig, path, legend_of=ax)


# ---- entry point ---------------------------------------------------------------------------------

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
    parser.add_argument("--compare", action="append", default=[], metavar="NAME",
                        help="with --baseline: a method to pair with it (repeatable; default: every other method)")
    parser.add_argument("--curve", action="append", default=[], metavar="NAME=DIR[,DIR...]",
                        help="training runs whose per-epoch validation R@K (non-English average) is drawn as one "
                             "learning curve, mean over the runs (repeatable; curves_r<K>.png)")
    args = parser.parse_args(argv)
    return run_command(lambda: report(args))


def paired_tables_of(args, methods, languages, recalls):
    """{k: paired table} of the methods named by --compare (default: all) against --baseline; {} without it."""
    labels = [m.label for m in methods]
    for option, names in (("--baseline", [args.baseline] if args.baseline else []), ("--compare", args.compare)):
        unknown = next((name for name in names if name not in labels), None)
        if unknown is not None:
            raise ReportError(f"{option} '{unknown}' is not a method of the report (they are: {', '.join(labels)})")
    if args.compare and not args.baseline:
        raise ReportError("--compare needs --baseline NAME: the method the others are paired with")
    if not args.baseline:
        return {}
    baseline = methods[labels.index(args.baseline)]
    compared = [m for m in methods if not args.compare or m.label in args.compare]  # paired() skips the baseline
    return {k: paired(compared, baseline, languages, args.metric_prefix, k) for k in recalls}


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
    paired_tables = paired_tables_of(args, methods, languages, recalls)
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
