"""Section 6, search at scale: torch brute force, exact FAISS and FAISS IVF over random unit vectors."""
import statistics

import torch

from utils.benchmark.timing import median, timed


def random_unit_vectors(n, dim, seed, block=65_536):
    """[n, dim] float32 rows drawn isotropically and L2-normalised, built block by block in place."""
    gen = torch.Generator().manual_seed(seed)
    out = torch.empty(n, dim)
    for start in range(0, n, block):
        rows = out[start:start + block]
        rows.normal_(generator=gen)
        rows.div_(rows.norm(dim=1, keepdim=True))
    return out


def recall_at(found, exact):
    """Mean over queries of the share of the exact top k that ``found`` also holds."""
    return statistics.fmean(len({i for i, _ in f} & {i for i, _ in e}) / len(e) for f, e in zip(found, exact))


def bench_search(sizes, dim=512, n_queries=500, n_single=50, nlist=1024, nprobes=(64, 256, 512, 768, 896),
                 k=10, repeats=1, log=print):
    """Build time, queries per second and recall@k of each search method of ``VideoIndex`` on random
    unit vectors. Isotropic data is the hard case for approximate search: a query's neighbours are
    barely closer than any other vector, so the IVF cells hold no locality to exploit."""
    from utils.inference import FaissExact, FaissIVF, TorchExact, VideoIndex
    results = []
    for n in sizes:
        embeddings = random_unit_vectors(n, dim, seed=0)
        queries = random_unit_vectors(n_queries, dim, seed=1)
        ids = range(n)
        indexes, build_s = {}, {}
        for name, method in (("torch", TorchExact()), ("faiss_exact", FaissExact()),
                             ("faiss_ivf", FaissIVF(nlist=min(nlist, n), nprobe=1))):
            index = VideoIndex(ids, embeddings, method)  # its id table is the same for every method: not timed
            build_s[name], indexes[name] = timed(index.build)
        ivf = indexes["faiss_ivf"]
        variants = {"torch": indexes["torch"], "faiss_exact": indexes["faiss_exact"]}
        variants.update({f"ivf_nprobe_{p}": ivf for p in sorted(nprobes) if p <= ivf.method.nlist})

        def search(name, batch):
            if name.startswith("ivf_nprobe_"):
                ivf.method.nprobe = int(name.removeprefix("ivf_nprobe_"))
            if batch:
                return variants[name].search(queries, k)
            return [variants[name].search(q[None], k)[0] for q in queries[:n_single]]

        # Interleaved: each round runs every method on the batch, then on the single queries.
        batch_s, single_s = {name: [] for name in variants}, {name: [] for name in variants}
        found = {}
        for _ in range(repeats):
            for name in variants:
                seconds, found[name] = timed(lambda: search(name, batch=True))
                batch_s[name].append(seconds)
            for name in variants:
                single_s[name].append(timed(lambda: search(name, batch=False))[0])
        rows = {name: {"recall": recall_at(found[name], found["faiss_exact"]),
                       "batch_qps": n_queries / median(batch_s[name]),
                       "single_qps": n_single / median(single_s[name])} for name in variants}
        for name, row in rows.items():
            log(f"  search N={n} {name}: recall@{k} {row['recall']:.3f}, {row['batch_qps']:.0f} queries/s in a "
                f"batch, {row['single_qps']:.1f} one at a time")
        # The fewest cells scanned that reach the target recall.
        best = next((name for name in rows if name.startswith("ivf") and rows[name]["recall"] >= 0.95), None)
        results.append({
            "n": n, "dim": dim, "k": k, "queries": n_queries, "single_queries": n_single, "repeats": repeats,
            "nlist": ivf.method.nlist,
            "build_s": build_s, "methods": rows,
            "ivf_at_recall_0.95": None if best is None else {
                "method": best, "recall": rows[best]["recall"],
                "batch_qps_over_exact": rows[best]["batch_qps"] / rows["faiss_exact"]["batch_qps"],
                "single_qps_over_exact": rows[best]["single_qps"] / rows["faiss_exact"]["single_qps"]}})
    return {"data": "random isotropic unit vectors; queries drawn the same way", "sizes": results}

