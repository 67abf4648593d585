"""Timing helpers of every section: interleaved runs (A B A B ...) and their medians."""
import statistics
import time

import torch


def _sync(device):
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device=None):
    _sync(device)
    start = time.perf_counter()
    out = fn()
    _sync(device)
    return time.perf_counter() - start, out


def interleaved(variants, repeats, device=None):
    """Run each variant ``repeats`` times in the order A B A B ...; {name: [seconds, ...]}."""
    times = {name: [] for name in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            times[name].append(timed(fn, device)[0])
    return times


def median(values):
    return float(statistics.median(values))

