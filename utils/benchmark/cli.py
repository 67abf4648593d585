"""``python -m utils.benchmark``: runs the sections, writes the JSON report and prints its table."""
import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

from utils.benchmark.c2kd_step import bench_c2kd_step
from utils.benchmark.data import bench_data
from utils.benchmark.extraction import bench_extraction
from utils.benchmark.flops import peak_bf16_flops
from utils.benchmark.gpu import bench_gpu_step
from utils.benchmark.ranking import bench_eval, eval_worker
from utils.benchmark.search import bench_search
from utils.benchmark.summary import format_report


def machine_info():
    info = {"platform": platform.platform(), "python": platform.python_version(), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "cuda_device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    try:
        import transformers
        info["transformers"] = transformers.__version__
        info["load_average"] = list(os.getloadavg())
    except (ImportError, OSError):
        pass
    return info


def _sizes(text):
    return [int(s) for s in text.replace("_", "").split(",") if s.strip()]


def build_parser():
    p = argparse.ArgumentParser(prog="python -m utils.benchmark",
                                description="Throughput benchmarks (data pipeline, C2KD step, ranking, GPU step, "
                                            "feature extraction, search).")
    p.add_argument("--out", default="benchmark.json", help="JSON file to write")
    p.add_argument("--quick", action="store_true", help="small sizes: a smoke test in seconds")
    p.add_argument("--assets-root", default="cache", help="Multi-Toy and tiny encoders (built if missing)")
    p.add_argument("--device", help="device of the C2KD-step and ranking benchmarks (default: cuda if available)")
    p.add_argument("--data-items", type=int, help="items per data-pipeline epoch (default: the toy training set)")
    p.add_argument("--data-repeats", type=int, help="interleaved epochs per loader")
    p.add_argument("--steps", type=int, help="interleaved C2KD steps per mode")
    p.add_argument("--eval-sizes", help="comma-separated N of the N x N ranking benchmark "
                                         "(default 1000,10000; --quick: 300)")
    p.add_argument("--eval-repeats", type=int, help="interleaved measurements per method and N")
    p.add_argument("--eval-dim", type=int, default=512)
    p.add_argument("--chunk-size", type=int, default=4096, help="rows/columns per block when ranking")
    p.add_argument("--materialise-limit", type=int, default=20_000,
                   help="largest N ranked through a materialised matrix (larger N: from embeddings only)")
    p.add_argument("--gpu-steps", type=int, default=10, help="interleaved full-size steps per mode (CUDA only)")
    p.add_argument("--peak-flops", type=float, help="peak dense bf16 FLOP/s of the GPU, when not detected by name")
    p.add_argument("--threads", type=int,
                   help="torch CPU threads (default: torch's choice, one per core; --quick: 1, which keeps a "
                        "smoke run fast on a busy machine)")
    p.add_argument("--search-sizes", help="comma-separated N of the search benchmark (default 100000,1000000; "
                                           "--quick: 3000)")
    p.add_argument("--search-nlist", type=int, help="IVF cells (default 1024; --quick: 32)")
    p.add_argument("--search-nprobe", help="comma-separated IVF cells scanned per query "
                                           "(default 64,256,512,768,896; --quick: 4,32)")
    p.add_argument("--search-queries", type=int, default=500, help="queries searched in one batch")
    p.add_argument("--search-single", type=int, default=50, help="of which searched one per call")
    p.add_argument("--search-repeats", type=int, default=1, help="interleaved rounds of the search benchmark")
    p.add_argument("--skip", default="", help="comma-separated sections to skip: data,c2kd,eval,gpu,extract,search")
    p.add_argument("--eval-worker", help=argparse.SUPPRESS)
    return p


def run(args, assets=None, log=print):
    threads = args.threads or (1 if args.quick else None)
    if not threads:
        return _run(args, assets, log)
    saved = torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")
    torch.set_num_threads(threads)
    os.environ["OMP_NUM_THREADS"] = str(threads)  # the ranking subprocesses
    try:
        return _run(args, assets, log)
    finally:
        torch.set_num_threads(saved[0])
        if saved[1] is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = saved[1]


def _run(args, assets, log):
    from common.hub import quiet_transformers
    quiet_transformers()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    quick = args.quick
    if assets is None and not {"data", "c2kd"} <= skip:
        from utils.tiny_encoders import ensure_toy_assets
        assets = ensure_toy_assets(args.assets_root)
    report = {"machine": machine_info(), "quick": quick}
    started = time.perf_counter()
    if "data" not in skip:
        log("data pipeline ...")
        report["data_pipeline"] = bench_data(assets, n_items=args.data_items or (128 if quick else None),
                                             repeats=args.data_repeats or (1 if quick else 3))
    if "c2kd" not in skip:
        log("C2KD training step ...")
        report["c2kd_step"] = bench_c2kd_step(assets, device, steps=args.steps or (2 if quick else 20),
                                              warmup=1 if quick else 2)
    if "eval" not in skip:
        log("ranking ...")
        sizes = _sizes(args.eval_sizes or ("300" if quick else "1000,10000"))
        report["evaluation"] = bench_eval(sizes, device, dim=args.eval_dim, chunk_size=args.chunk_size,
                                          repeats=args.eval_repeats or (1 if quick else 3),
                                          materialise_limit=args.materialise_limit, log=log)
    if "gpu" not in skip:
        if torch.cuda.is_available():
            log("full-size C2KD step on the GPU ...")
            name = torch.cuda.get_device_name(0)
            report["gpu_step"] = bench_gpu_step(torch.device("cuda"), steps=2 if quick else args.gpu_steps,
                                                warmup=1 if quick else 3,
                                                peak_flops=args.peak_flops or peak_bf16_flops(name))
        else:
            report["gpu_step"] = {"skipped": "no CUDA device"}
    if "extract" not in skip:
        log("feature extraction ...")
        devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
        report["extraction"] = (bench_extraction(devices, n_videos=2, seconds=2.0, source=(120, 160), quick=True)
                                if quick else bench_extraction(devices))
    if "search" not in skip:
        log("search at scale ...")
        report["search"] = bench_search(_sizes(args.search_sizes or ("3000" if quick else "100000,1000000")),
                                        n_queries=100 if quick else args.search_queries,
                                        n_single=10 if quick else args.search_single,
                                        nlist=args.search_nlist or (32 if quick else 1024),
                                        nprobes=_sizes(args.search_nprobe or ("4,32" if quick else
                                                                              "64,256,512,768,896")),
                                        repeats=args.search_repeats, log=log)
    report["total_s"] = time.perf_counter() - started
    return report



def main(argv=None, assets=None):
    args = build_parser().parse_args(argv)
    if args.eval_worker:
        print(json.dumps(eval_worker(json.loads(args.eval_worker))))
        return 0
    report = {"command": " ".join(["python -m utils.benchmark", *(sys.argv[1:] if argv is None else argv)]),
              **run(args, assets=assets)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(format_report(report))
    print(f"wrote {args.out}")
    return 0


