"""Section 3, ranking N x N: one-pass against two-pass ranking, a materialised matrix and the products alone."""
import json
import resource
import subprocess
import sys

import torch

from utils.benchmark import ROOT
from utils.benchmark.timing import median, timed


def _peak_rss_bytes():
    """This process's peak resident memory. VmHWM belongs to the process's own address space;
    getrusage's ru_maxrss (the fallback) also carries the parent's peak across fork and exec."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _reset_peak_rss():
    """Lower the process's peak-RSS mark to its current RSS (Linux >= 4.0), so that a following
    delta measures the peak of what runs next, not a peak left over from start-up."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def two_pass_ranks(queries, videos, query_video, chunk_size=4096, tie_break="averaging"):
    """The ranking one-pass ranking replaced, kept as this benchmark's comparison: t2v from blocks
    of queries (chunk @ videos.T), v2t from blocks of videos (queries @ chunk.T), with eager
    comparisons, so every score is computed twice."""
    from model.metric import _summarise
    num_q, num_v = len(queries), len(videos)
    t2v = ([], [], [])
    for start in range(0, num_q, chunk_size):
        rows = queries[start:start + chunk_size] @ videos.t()
        gt = rows.gather(1, query_video[start:start + chunk_size, None])
        t2v[0].append((rows > gt).sum(1, dtype=torch.int32).cpu())
        t2v[1].append((rows == gt).sum(1, dtype=torch.int32).cpu())
        t2v[2].append(torch.ones(len(rows), dtype=torch.int32))
    v2t = ([], [], [])
    all_queries = torch.arange(num_q, device=queries.device)
    for start in range(0, num_v, chunk_size):
        end = min(start + chunk_size, num_v)
        cols = queries @ videos[start:end].t()
        inside = (query_video >= start) & (query_video < end)
        q_in, col_in = all_queries[inside], query_video[inside] - start
        own = cols[q_in, col_in]
        best = torch.full((end - start,), float("-inf"), dtype=cols.dtype, device=cols.device)
        best = best.scatter_reduce(0, col_in, own, reduce="amax")
        at_best = torch.zeros(end - start, dtype=torch.int32, device=cols.device)
        at_best = at_best.scatter_add(0, col_in, (own == best[col_in]).int())
        has_query = (at_best > 0).cpu()
        v2t[0].append((cols > best).sum(0, dtype=torch.int32).cpu()[has_query])
        v2t[1].append((cols == best).sum(0, dtype=torch.int32).cpu()[has_query])
        v2t[2].append(at_best.cpu()[has_query])
    return {name: _summarise(*(torch.cat(c) for c in counts), tie_break, None)
            for name, counts in (("t2v", t2v), ("v2t", v2t))}


def products_only(queries, videos, chunk_size=4096):
    """The matrix products of one-pass ranking and nothing else: the floor of its time."""
    for r in range(0, len(queries), chunk_size):
        for c in range(0, len(videos), chunk_size):
            queries[r:r + chunk_size] @ videos[c:c + chunk_size].t()


RANKING_METHODS = ("matrix", "two_pass", "one_pass", "products")


def eval_worker(spec):
    """One ranking measurement in a fresh process: seconds and peak extra memory in bytes."""
    from model.metric import (COMPILE_MIN_SCORES, _fused_tile_counts, retrieval_metrics,
                              retrieval_metrics_from_embeddings)
    n, dim, device = spec["n"], spec["dim"], torch.device(spec["device"])
    gen = torch.Generator(device=device).manual_seed(spec.get("seed", 0))
    # Built in place, so that building leaves no higher memory mark than what it keeps.
    videos = torch.randn(n, dim, generator=gen, device=device)
    videos.div_(videos.norm(dim=1, keepdim=True))
    queries = torch.randn(n, dim, generator=gen, device=device)
    # Noisy copies of the videos: the ground truth usually, but not always, ranks first.
    queries.mul_(spec.get("noise", 0.3)).add_(videos)
    queries.div_(queries.norm(dim=1, keepdim=True))
    query_video = torch.arange(n, device=device)
    chunk, method = spec["chunk_size"], spec["method"]
    rank = {"matrix": lambda q, v, qv: retrieval_metrics(q @ v.t(), qv, chunk_size=chunk),
            "two_pass": lambda q, v, qv: two_pass_ranks(q, v, qv, chunk_size=chunk),
            "one_pass": lambda q, v, qv: retrieval_metrics_from_embeddings(q, v, qv, chunk_size=chunk),
            "products": lambda q, v, qv: products_only(q, v, chunk_size=chunk)}[method]

    def run():
        return rank(queries, videos, query_video)

    rank(queries[:16], videos[:16], query_video[:16])  # one-off initialisation (CUDA context, kernels)
    compile_s = None
    if method == "one_pass" and n * n >= COMPILE_MIN_SCORES:
        # Compiling the fused comparisons is a one-off per process (and cached on disk): once for
        # square tiles and once for the others (torch.compile specialises on equal sizes).
        def compile_counts():
            for cols in (64, 48):
                tile = queries[:64] @ videos[:cols].t()
                _fused_tile_counts(tile, tile[:, 0].clone()[:, None], tile[0].clone()[None])
        compile_s, _ = timed(compile_counts, device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        reset = True
    else:
        reset = _reset_peak_rss()
        before = _peak_rss_bytes()
    seconds, metrics = timed(run, device)
    peak = (torch.cuda.max_memory_allocated(device) if device.type == "cuda" else _peak_rss_bytes()) - before
    return {"seconds": seconds, "peak_bytes": int(peak), "peak_mark_reset": reset, "metrics": metrics,
            "compile_s": compile_s}


def _run_worker(spec):
    out = subprocess.run([sys.executable, "-m", "utils.benchmark", "--eval-worker", json.dumps(spec)],
                         cwd=ROOT, capture_output=True, text=True, check=False)
    if out.returncode:
        raise RuntimeError(f"ranking worker {spec} failed:\n{out.stderr.strip()[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def bench_eval(sizes, device, dim=512, chunk_size=4096, repeats=3, materialise_limit=20_000, log=print):
    """Ranking time and peak memory of N x N sets: one-pass ranking from embeddings against the
    two-pass ranking it replaced, a materialised matrix (up to ``materialise_limit``) and the
    matrix products alone."""
    results = []
    for n in sizes:
        methods = [m for m in RANKING_METHODS if m != "matrix" or n <= materialise_limit]
        reps = repeats if n <= materialise_limit else 1
        runs = {m: [] for m in methods}
        for _ in range(reps):
            for m in methods:
                runs[m].append(_run_worker({"n": n, "dim": dim, "device": str(device), "method": m,
                                            "chunk_size": chunk_size}))
        row = {"n": n, "dim": dim, "chunk_size": chunk_size, "repeats": reps,
               "peak_mark_reset": all(r["peak_mark_reset"] for rs in runs.values() for r in rs),
               "compile_s": runs["one_pass"][0]["compile_s"]}
        for m in methods:
            row[m] = {"seconds": median([r["seconds"] for r in runs[m]]),
                      "peak_mib": median([r["peak_bytes"] for r in runs[m]]) / 2**20,
                      "samples_s": [r["seconds"] for r in runs[m]]}
            if m != "products":
                row[m].update(t2v_R1=runs[m][0]["metrics"]["t2v"]["R1"], v2t_R1=runs[m][0]["metrics"]["v2t"]["R1"])
        ranked = [m for m in methods if m != "products"]
        row["same_metrics"] = all(runs[m][0]["metrics"] == runs["one_pass"][0]["metrics"] for m in ranked)
        row["two_pass_over_one_pass"] = row["two_pass"]["seconds"] / row["one_pass"]["seconds"]
        row["one_pass_over_products"] = row["one_pass"]["seconds"] / row["products"]["seconds"]
        log(f"  ranking N={n}: " + ", ".join(f"{m} {row[m]['seconds']:.2f} s" for m in methods))
        results.append(row)
    return {"device": str(device), "memory": "increase of the peak resident memory (VmHWM) of a fresh process "
                                              "(CPU), or of torch.cuda.max_memory_allocated (GPU)",
            "sizes": results}

