"""Text-video retrieval metrics (R@K, MedR, MeanR), vectorised in torch.

Protocol:
* t2v: the 0-based rank of a query is the number of videos scoring above its
  ground-truth video, plus a tie term set by ``tie_break``: "optimistic" (ties
  ignored), "pessimistic" (every other tied item counts as above) or
  "averaging" (half of the other tied items; ranks may be fractional).
* v2t: a video's rank is the best (minimum) rank, within its column, over the
  queries (captions) describing it; videos without any caption are skipped.
* R@K = 100 * #(rank < K) / denominator, where the denominator is
  ``total_queries`` when given (the complete dataset size: missing items count
  as failures), else the number of ranked items. MedR / MeanR are
  median / mean rank + 1 over the ranked items only.
"""

import numpy as np
import torch

TIE_BREAKS = ("optimistic", "pessimistic", "averaging")
_TIE_WEIGHT = {"optimistic": 0.0, "pessimistic": 1.0, "averaging": 0.5}
RECALL_KS = (1, 5, 10, 50)


def _summarise(ranks: torch.Tensor, total_queries: int | None) -> dict[str, float]:
    n = ranks.numel()
    denom = n if total_queries is None else total_queries
    if denom < n:
        raise ValueError(f"total_queries={total_queries} is smaller than the {n} ranked queries")
    out = {f"R{k}": 100.0 * (ranks < k).sum().item() / denom if denom else float("nan") for k in RECALL_KS}
    arr = ranks.numpy()
    out["MedR"] = float(np.median(arr)) + 1 if n else float("nan")
    out["MeanR"] = float(arr.mean()) + 1 if n else float("nan")
    out["num_queries"] = float(n)
    return out


def _rank(greater: torch.Tensor, equal_others: torch.Tensor, weight: float) -> torch.Tensor:
    return greater.double().cpu() + weight * equal_others.double().cpu()


def retrieval_metrics(sims: torch.Tensor, query_video: torch.Tensor, tie_break: str = "averaging",
                      total_queries: int | None = None, chunk_size: int = 4096) -> dict[str, dict[str, float]]:
    """Compute t2v and v2t retrieval metrics.

    sims: [Q, V] query-to-video similarities; query_video: [Q] index of each
    query's ground-truth video. Rows (t2v) and columns (v2t) are processed in
    chunks of ``chunk_size`` so only a chunk-sized temporary is allocated.
    """
    if tie_break not in _TIE_WEIGHT:
        raise ValueError(f"unknown tie_break {tie_break!r}; expected one of {TIE_BREAKS}")
    if sims.dim() != 2:
        raise ValueError(f"sims must be 2-D [Q, V], got shape {tuple(sims.shape)}")
    if not sims.is_floating_point():
        sims = sims.double()
    num_q, num_v = sims.shape
    query_video = torch.as_tensor(query_video, dtype=torch.long, device=sims.device).reshape(-1)
    if query_video.numel() != num_q:
        raise ValueError(f"query_video has {query_video.numel()} entries for {num_q} queries")
    if num_q and (query_video.min() < 0 or query_video.max() >= num_v):
        raise ValueError(f"query_video entries must lie in [0, {num_v})")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    weight = _TIE_WEIGHT[tie_break]

    # t2v: compare each row with the score of its ground-truth video.
    t2v = []
    for start in range(0, num_q, chunk_size):
        rows = sims[start:start + chunk_size]
        if rows.isnan().any():
            raise ValueError("sims contains NaN")
        gt = rows.gather(1, query_video[start:start + chunk_size, None])
        t2v.append(_rank((rows > gt).sum(1), (rows == gt).sum(1) - 1, weight))

    # v2t: every tie rule gives a rank that is non-increasing in the score, so
    # the minimum over a video's captions is the rank of its best caption score.
    v2t = []
    for start in range(0, num_v, chunk_size):
        cols = sims[:, start:start + chunk_size]
        vids = torch.arange(start, start + cols.shape[1], device=sims.device)
        relevant = query_video[:, None] == vids[None, :]
        has_query = relevant.any(0)
        best = cols.masked_fill(~relevant, float("-inf")).max(0).values[None, :]
        rank = _rank((cols > best).sum(0), (cols == best).sum(0) - 1, weight)
        v2t.append(rank[has_query.cpu()])

    empty = torch.zeros(0, dtype=torch.float64)
    return {
        "t2v": _summarise(torch.cat(t2v) if t2v else empty, total_queries),
        "v2t": _summarise(torch.cat(v2t) if v2t else empty, total_queries),
    }


def mean_over_languages(per_lang: dict[str, dict[str, dict[str, float]]],
                        exclude: tuple[str, ...] = ()) -> dict[str, dict[str, float]]:
    """Average every statistic of ``retrieval_metrics`` outputs over languages."""
    langs = [lang for lang in per_lang if lang not in exclude]
    if not langs:
        return {}
    first = per_lang[langs[0]]
    return {
        direction: {stat: sum(per_lang[lang][direction][stat] for lang in langs) / len(langs)
                    for stat in first[direction]}
        for direction in first
    }


def format_table(per_lang: dict[str, dict], direction="t2v",
                 stats=("R1", "R5", "R10", "R50", "MedR", "MeanR")) -> str:
    """Plain-text table with one row per language and one column per statistic."""
    header = [direction, *stats]
    rows = [[str(lang), *(f"{metrics[direction][stat]:.1f}" for stat in stats)]
            for lang, metrics in per_lang.items()]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    def fmt(row):
        return "  ".join([row[0].ljust(widths[0]), *(c.rjust(w) for c, w in zip(row[1:], widths[1:]))])

    return "\n".join(fmt(row) for row in [header, *rows])
