"""The short table printed after a run, one block of lines per section of the report."""
from utils.benchmark.ranking import RANKING_METHODS


def _cached_vs_online(step):
    return (f"cached {1e3 * step['cached_step_s']:.1f} ms   online {1e3 * step['online_step_s']:.1f} ms   "
            f"online/cached {step['online_over_cached']:.2f}x")


def data_lines(d):
    return [f"data pipeline ({d['items']} items, batch {d['batch_size']}, {len(d['languages'])} languages, "
            f"student + {len(d['tokenizers']['teachers'])} teacher tokenizers)",
            f"  project   {d['project_items_per_s']:10.0f} items/s   (pre-tokenization once: "
            f"{d['project_setup_s']:.2f} s)",
            f"  reference {d['reference_items_per_s']:10.0f} items/s   "
            f"({d['tokenizer_calls_per_item']['reference']} tokenizer calls per item)",
            f"  ratio     {d['steady_state_ratio']:.1f}x steady state, "
            f"{d['one_epoch_with_setup_ratio']:.1f}x for one epoch including setup"]


def c2kd_lines(c):
    f, lengths = c["model_flops"], c["text_lengths"]
    buckets = ", ".join(f"{rows}x{columns}" for rows, columns in lengths["student_buckets"])
    return [f"C2KD training step ({c['device']}, batch {c['batch_size']}, {len(c['languages'])} languages)",
            f"  {_cached_vs_online(c)}   (embedding the training set for the cache, once: "
            f"{c['cache_build_s']:.2f} s; {c['cache_build_full_padding_s']:.2f} s over every text column)",
            f"  online teachers in train mode, as the reference ran them: "
            f"{1e3 * c['online_reference_step_s']:.1f} ms   "
            f"reference/cached {c['online_reference_over_cached']:.2f}x",
            f"  the reference's step (also every text column up to max_words): "
            f"{1e3 * c['reference_step_s']:.1f} ms   reference/cached {c['reference_over_cached']:.2f}x",
            f"  student without dropout: {_cached_vs_online(c['without_student_dropout'])}",
            f"  cached step with the student's captions as one batch cut to its longest "
            f"({lengths['student_one_bucket']} columns): {1e3 * c['cached_one_bucket_step_s']:.1f} ms   "
            f"{c['one_bucket_over_buckets']:.2f}x the step in length buckets (rows x columns: {buckets})",
            f"  ... and over all {lengths['max_words']} text columns: "
            f"{1e3 * c['cached_full_padding_step_s']:.1f} ms   {c['full_padding_over_one_bucket']:.2f}x one batch cut",
            f"  model FLOPs: student {f['student'] / 1e9:.2f} G, teachers {f['teachers'] / 1e9:.2f} G, "
            f"bound on online/cached {f['online_over_cached_bound']:.2f}x"]


def ranking_lines(e):
    lines = [f"ranking N x N ({e['device']})"]
    for row in e["sizes"]:
        parts = [f"{m} {row[m]['seconds']:.2f} s, {row[m]['peak_mib']:.0f} MiB" for m in RANKING_METHODS if m in row]
        lines.append(f"  N={row['n']:<7} " + "   ".join(parts))
        lines.append(f"    two-pass/one-pass {row['two_pass_over_one_pass']:.2f}x   one-pass/products "
                     f"{row['one_pass_over_products']:.2f}x   identical metrics: {row['same_metrics']}   "
                     + (f"   (compiling the fused comparisons, once: {row['compile_s']:.1f} s)" if row["compile_s"] else ""))
    return lines


def search_lines(s):
    lines = [f"search at scale ({s['data']})"]
    for row in s["sizes"]:
        build = ", ".join(f"{name} {seconds:.1f} s" for name, seconds in row["build_s"].items())
        lines.append(f"  N={row['n']:<8} build: {build}")
        for name, m in row["methods"].items():
            lines.append(f"    {name:16} recall@{row['k']} {m['recall']:.3f}   {m['batch_qps']:9.1f} queries/s "
                         f"in a batch of {row['queries']}   {m['single_qps']:8.1f} one at a time")
        best = row["ivf_at_recall_0.95"]
        lines.append("    IVF at recall >= 0.95: " + (
            f"{best['method']}, {best['batch_qps_over_exact']:.2f}x exact FAISS in a batch, "
            f"{best['single_qps_over_exact']:.2f}x one at a time" if best else "not reached"))
    return lines


def gpu_lines(g):
    if "skipped" in g:
        return [f"GPU step: skipped: {g['skipped'].removeprefix('skipped: ')}"]
    lines = [f"GPU step ({g['device']}, {g['autocast']})"]
    for m in ("cached", "online"):
        mfu = f"{100 * g[m]['mfu']:.1f}%" if g[m]["mfu"] else "n/a"
        lines.append(f"  {m:7} {1e3 * g[m]['step_s']:.1f} ms   MFU {mfu}")
    lines.append(f"  online/cached {g['online_over_cached']:.2f}x")
    return lines


def extraction_lines(x):
    lines = [f"feature extraction ({x['videos']} videos of {x['seconds']:g} s, {x['source']}; videos/s)"]
    for name, row in x["encoders"].items():
        encode = "   ".join(f"encode {device} {v:.2f}" for device, v in row["encode_videos_per_s"].items())
        lines.append(f"  {name:4} decode {row['decode_videos_per_s']:.2f} (one process)   {encode}   "
                     f"({row['units_per_video']:g} inputs per video)")
    return lines


# Report key -> its lines, in the order they are printed.
SECTION_LINES = (("data_pipeline", data_lines), ("c2kd_step", c2kd_lines), ("evaluation", ranking_lines),
                 ("search", search_lines), ("gpu_step", gpu_lines), ("extraction", extraction_lines))


def format_report(report):
    lines = []
    for key, section_lines in SECTION_LINES:
        if report.get(key):
            lines += section_lines(report[key])
    return "\n".join(lines)
