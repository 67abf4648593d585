"""Text-video retrieval metrics (R@K, MedR, MeanR), vectorised in torch.

Protocol:
* t2v: a query's ground-truth video has a = #videos scoring strictly above it and m = #videos
  scoring equal to it (itself included), so it sits somewhere in positions [a, a + m) (0-based).
  ``tie_break`` decides where: "optimistic" at a, "pessimistic" at a + m - 1, or "averaging",
  the expectation under a uniformly random order of the tied items: rank a + (m - 1) / 2
  (fractional) for MedR / MeanR, and a hit at K with probability clamp((K - a) / m, 0, 1), so a
  2-way tie at the top counts 1/2 towards R@1 and a 3-way tie 1/3.
* v2t: a video's score is its best (maximum) caption score in its column; a and m are counted in
  that column, over all queries. Any caption of the video is a correct answer, so when c of the m
  tied captions are its own (c > 1 only for exact duplicates under ``multi_caption = separate``),
  the video's rank is that of the first of them: a, a + m - c, or a + (m - c) / (c + 1) for
  "averaging", and a hit at K with probability 1 - C(m - c, j) / C(m, j), j = clamp(K - a, 0, m)
  (for c = 1 these are the t2v rules). Videos without any caption are skipped.
* R@K = 100 * (sum of the hits at K) / denominator, where the denominator is
  ``total_queries`` when given (the complete dataset size: missing items count
  as failures), else the number of ranked items. MedR / MeanR are
  median / mean rank + 1 over the ranked items only.

The reference always ranked optimistically (c2kd-reference §4); "averaging" is the default here.

``retrieval_metrics`` takes a similarity matrix; ``retrieval_metrics_from_embeddings`` takes the
query and video embeddings and ranks block by block, for sets whose [Q, V] matrix would not fit.
"""

import numpy as np
import torch

TIE_BREAKS = ("optimistic", "pessimistic", "averaging")
RECALL_KS = (1, 5, 10, 50)
STATS = tuple(f"R{k}" for k in RECALL_KS) + ("MedR", "MeanR")  # each direction's statistics


def _summarise(above: torch.Tensor, tied: torch.Tensor, correct: torch.Tensor, tie_break: str,
               total_queries: int | None) -> dict[str, float]:
    """Statistics of items whose ground truth has ``above`` strictly better scores and ``tied``
    equal ones, ``correct`` of which (at least 1: itself) are correct answers."""
    n = above.numel()
    denom = n if total_queries is None else total_queries
    if denom < n:
        raise ValueError(f"total_queries={total_queries} is smaller than the {n} ranked queries")
    above, tied, correct = above.double(), tied.double(), correct.double()
    wrong = tied - correct  # tied items that are not correct answers
    if tie_break == "optimistic":
        ranks = above
    elif tie_break == "pessimistic":
        ranks = above + wrong
    else:  # the expected number of wrong items before the first correct one in a random order
        ranks = above + wrong / (correct + 1)

    def hits(k):
        if tie_break != "averaging":
            return (ranks < k).double()
        # The chance that a random order of the tied items puts a correct one before position k:
        # 1 - C(wrong, j) / C(tied, j) for j tied positions before k (j / tied when one is correct).
        j = (k - above).clamp(0, None).minimum(tied)
        log_miss = (torch.lgamma(wrong + 1) - torch.lgamma((wrong - j).clamp(min=0) + 1)
                    - torch.lgamma(tied + 1) + torch.lgamma(tied - j + 1))
        miss = torch.where(j > wrong, 0.0, log_miss.exp())
        return torch.where(correct == 1, j / tied, 1 - miss)

    out = {f"R{k}": 100.0 * hits(k).sum().item() / denom if denom else float("nan") for k in RECALL_KS}
    arr = ranks.numpy()
    out["MedR"] = float(np.median(arr)) + 1 if n else float("nan")
    out["MeanR"] = float(arr.mean()) + 1 if n else float("nan")
    out["num_queries"] = float(n)
    return out


def _check_tie_break(tie_break):
    if tie_break not in TIE_BREAKS:
        raise ValueError(f"unknown tie_break {tie_break!r}; expected one of {TIE_BREAKS}")


def _count(mask: torch.Tensor, dim: int) -> torch.Tensor:
    # int32 counts: a bool reduction would otherwise go through an int64 copy of the whole block.
    return mask.sum(dim, dtype=torch.int32)


def _check_query_video(query_video, num_q, num_v, device):
    query_video = torch.as_tensor(query_video, dtype=torch.long, device=device).reshape(-1)
    if query_video.numel() != num_q:
        raise ValueError(f"query_video has {query_video.numel()} entries for {num_q} queries")
    if num_q and (query_video.min() < 0 or query_video.max() >= num_v):
        raise ValueError(f"query_video entries must lie in [0, {num_v})")
    return query_video


def _ranks_by_blocks(row_block, col_block, query_video, num_q, num_v, tie_break, chunk_size, total_queries):
    """Ranks from score blocks. ``row_block(start, end)`` gives scores [end - start, V] of those
    queries; ``col_block(start, end)`` gives scores [Q, end - start] of those videos."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    device = query_video.device

    # t2v: compare each row with the score of its ground-truth video (its one correct answer).
    t2v = ([], [], [])
    for start in range(0, num_q, chunk_size):
        rows = row_block(start, min(start + chunk_size, num_q))
        if rows.isnan().any():
            raise ValueError("sims contains NaN")
        gt = rows.gather(1, query_video[start:start + chunk_size, None])
        t2v[0].append(_count(rows > gt, 1).cpu())
        t2v[1].append(_count(rows == gt, 1).cpu())
        t2v[2].append(torch.ones(len(rows), dtype=torch.int32))
        del rows

    # v2t: every tie rule gives a rank that is non-increasing in the score, so
    # the minimum over a video's captions is the rank of its best caption score.
    v2t = ([], [], [])
    all_queries = torch.arange(num_q, device=device)
    for start in range(0, num_v, chunk_size):
        end = min(start + chunk_size, num_v)
        cols = col_block(start, end)
        # The queries describing a video of this block, and their scores, read from this block.
        inside = (query_video >= start) & (query_video < end)
        q_in, col_in = all_queries[inside], query_video[inside] - start
        best = torch.full((end - start,), float("-inf"), dtype=cols.dtype, device=device)
        own = cols[q_in, col_in]
        best = best.scatter_reduce(0, col_in, own, reduce="amax")
        # The video's own captions at its best score: every one of them is a correct answer.
        at_best = torch.zeros(end - start, dtype=torch.int32, device=device)
        at_best = at_best.scatter_add(0, col_in, (own == best[col_in]).int())
        has_query = (at_best > 0).cpu()
        v2t[0].append(_count(cols > best, 0).cpu()[has_query])
        v2t[1].append(_count(cols == best, 0).cpu()[has_query])
        v2t[2].append(at_best.cpu()[has_query])
        del cols

    def summarise(counts):
        above, tied, correct = (torch.cat(c) if c else torch.zeros(0, dtype=torch.int32) for c in counts)
        return _summarise(above, tied, correct, tie_break, total_queries)
    return {"t2v": summarise(t2v), "v2t": summarise(v2t)}


def retrieval_metrics(sims: torch.Tensor, query_video: torch.Tensor, tie_break: str = "averaging",
                      total_queries: int | None = None, chunk_size: int = 4096) -> dict[str, dict[str, float]]:
    """Compute t2v and v2t retrieval metrics.

    sims: [Q, V] query-to-video similarities; query_video: [Q] index of each
    query's ground-truth video. Rows (t2v) and columns (v2t) are processed in
    chunks of ``chunk_size`` so only chunk-sized temporaries are allocated.
    """
    _check_tie_break(tie_break)
    if sims.dim() != 2:
        raise ValueError(f"sims must be 2-D [Q, V], got shape {tuple(sims.shape)}")
    if not sims.is_floating_point():
        sims = sims.double()
    num_q, num_v = sims.shape
    query_video = _check_query_video(query_video, num_q, num_v, sims.device)
    return _ranks_by_blocks(lambda a, b: sims[a:b], lambda a, b: sims[:, a:b], query_video, num_q, num_v,
                            tie_break, chunk_size, total_queries)


def retrieval_metrics_from_embeddings(queries: torch.Tensor, videos: torch.Tensor, query_video: torch.Tensor,
                                      tie_break: str = "averaging", total_queries: int | None = None,
                                      chunk_size: int = 4096) -> dict[str, dict[str, float]]:
    """``retrieval_metrics(queries @ videos.T, ...)`` without ever holding the [Q, V] matrix.

    queries: [Q, D]; videos: [V, D]; query_video: [Q]. The work runs on the device of the
    embeddings (a GPU in practice). t2v takes blocks of ``chunk_size`` queries (chunk @ videos.T,
    [chunk_size, V]); v2t takes blocks of ``chunk_size`` videos (queries @ chunk.T, [Q, chunk_size]).
    Only one block of scores and its comparison masks exist at a time; each score is computed
    twice in all (once per direction).

    t2v compares each row with its own ground-truth score; v2t takes a video's best caption score
    from the same block it compares against. Ranks are therefore self-consistent, and equal the
    materialised matrix's whenever the two matrix products round alike: always for exactly
    representable scores (e.g. quantised embeddings), and for float embeddings unless a rounding
    difference reorders two scores that agree to the last bits.
    """
    _check_tie_break(tie_break)
    if queries.dim() != 2 or videos.dim() != 2:
        raise ValueError(f"queries and videos must be 2-D [N, D], got shapes {tuple(queries.shape)} "
                         f"and {tuple(videos.shape)}")
    if queries.shape[1] != videos.shape[1]:
        raise ValueError(f"queries have dimension {queries.shape[1]} but videos have {videos.shape[1]}")
    if queries.device != videos.device:
        raise ValueError(f"queries are on {queries.device} but videos are on {videos.device}")
    # The dtype of the materialised product, made floating point as retrieval_metrics does.
    dtype = torch.promote_types(queries.dtype, videos.dtype)
    if not dtype.is_floating_point:
        dtype = torch.float64
    queries, videos = queries.to(dtype), videos.to(dtype)
    num_q, num_v = queries.shape[0], videos.shape[0]
    query_video = _check_query_video(query_video, num_q, num_v, queries.device)
    return _ranks_by_blocks(lambda a, b: queries[a:b] @ videos.t(), lambda a, b: queries @ videos[a:b].t(),
                            query_video, num_q, num_v, tie_break, chunk_size, total_queries)


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
