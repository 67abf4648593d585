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

The reference always ranked optimistically (docs/reference.md §4); "averaging" is the default here.

``retrieval_metrics`` takes a similarity matrix; ``retrieval_metrics_from_embeddings`` takes the
query and video embeddings and ranks tile by tile, for sets whose [Q, V] matrix would not fit.
Both go through ``rank_scores``, which also ranks re-ranked scores (model/rerank.py).
"""

import warnings

import numpy as np
import torch

from data_loader.corpus import ENGLISH

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


def _tile_counts(tile, row_ref, col_ref):
    """Per row of ``tile``: scores above and equal to its ``row_ref``; per column: the same for its ``col_ref``."""
    return (_count(tile > row_ref, 1), _count(tile == row_ref, 1),
            _count(tile > col_ref, 0), _count(tile == col_ref, 0))


# Eager, the four comparisons and sums sweep a tile eight times and cost more than the matrix
# product that made it; compiled, they fuse into one sweep. Compiling takes seconds once per
# process (square tiles and the others compile apart; torch caches both on disk), so only
# rankings of at least this many scores use it.
COMPILE_MIN_SCORES = 2**26
_compiled_tile_counts = None


def _fused_tile_counts(tile, row_ref, col_ref):
    global _compiled_tile_counts
    if _compiled_tile_counts is None:
        _compiled_tile_counts = torch.compile(_tile_counts, dynamic=True)
    try:
        # References rebuilt from fresh 1-D copies: torch.compile guards the sizes and strides of
        # a view's base too, so views of the whole [N] vectors would compile again in the pass.
        return _compiled_tile_counts(tile, row_ref.reshape(-1).clone()[:, None], col_ref.reshape(-1).clone()[None])
    except Exception as e:  # e.g. no C++ compiler: the same counts, eagerly
        warnings.warn(f"ranking without torch.compile ({type(e).__name__}: {str(e).splitlines()[0]})")
        _compiled_tile_counts = _tile_counts
        return _tile_counts(tile, row_ref, col_ref)


def _check_query_video(query_video, num_q, num_v, device):
    query_video = torch.as_tensor(query_video, dtype=torch.long, device=device).reshape(-1)
    if query_video.numel() != num_q:
        raise ValueError(f"query_video has {query_video.numel()} entries for {num_q} queries")
    if num_q and (query_video.min() < 0 or query_video.max() >= num_v):
        raise ValueError(f"query_video entries must lie in [0, {num_v})")
    return query_video


class MatrixScores:
    """The scores of a materialised [Q, V] matrix, tile by tile."""

    def __init__(self, sims: torch.Tensor, query_video):
        if sims.dim() != 2:
            raise ValueError(f"sims must be 2-D [Q, V], got shape {tuple(sims.shape)}")
        if not sims.is_floating_point():
            sims = sims.double()
        if sims.isnan().any():
            raise ValueError("sims contains NaN")
        self.sims, self.shape, self.device = sims, tuple(sims.shape), sims.device
        self.query_video = _check_query_video(query_video, *self.shape, sims.device)
        self.own = sims.gather(1, self.query_video[:, None]).squeeze(1)  # each query's ground-truth score

    def tile(self, rows: slice, cols: slice) -> torch.Tensor:
        return self.sims[rows, cols]


def _all_finite(x: torch.Tensor) -> bool:
    # min and max carry any NaN or infinity: one sweep without a temporary (isfinite makes one).
    return x.numel() == 0 or bool(torch.stack(x.aminmax()).isfinite().all())


class EmbeddingScores:
    """The scores ``queries @ videos.T``, tile by tile, never holding the [Q, V] matrix.

    Each query's ground-truth score (``own``) is computed before the pass and written into every
    tile that holds it, so that both directions rank against one value. Ranks therefore equal the
    materialised matrix's whenever the two products round that entry alike: always for exactly
    representable scores (e.g. quantised embeddings), and for float embeddings on BLAS libraries
    whose rounding of an entry does not depend on the product's shape (see ``_own_scores``).
    """

    def __init__(self, queries: torch.Tensor, videos: torch.Tensor, query_video):
        if queries.dim() != 2 or videos.dim() != 2:
            raise ValueError(f"queries and videos must be 2-D [N, D], got shapes {tuple(queries.shape)} "
                             f"and {tuple(videos.shape)}")
        if queries.shape[1] != videos.shape[1]:
            raise ValueError(f"queries have dimension {queries.shape[1]} but videos have {videos.shape[1]}")
        if queries.device != videos.device:
            raise ValueError(f"queries are on {queries.device} but videos are on {videos.device}")
        # The dtype of the materialised product, made floating point as MatrixScores does.
        dtype = torch.promote_types(queries.dtype, videos.dtype)
        if not dtype.is_floating_point:
            dtype = torch.float64
        self.queries, self.videos = queries.to(dtype), videos.to(dtype)
        if not (_all_finite(self.queries) and _all_finite(self.videos)):
            raise ValueError("queries or videos contain NaN or infinite values")
        self.shape, self.device = (len(queries), len(videos)), queries.device
        self.query_video = _check_query_video(query_video, *self.shape, queries.device)
        self.own = self._own_scores()

    def _own_scores(self, block=128):
        """Each query's ground-truth score, as the diagonal of [block, block] matrix products: a
        product rounds an entry alike whatever the size of its blocks (above a few rows; MKL does,
        tested), unlike a row-by-row dot product, so the ground truths equal the tiles' own entries."""
        num_q = len(self.queries)
        own = torch.empty(num_q, dtype=self.queries.dtype, device=self.device)
        for start in range(0, num_q, block):
            rows = slice(max(0, min(start, num_q - block)), min(start + block, num_q))  # the last block full too
            own[rows] = (self.queries[rows] @ self.videos[self.query_video[rows]].t()).diagonal()
        return own

    def tile(self, rows: slice, cols: slice) -> torch.Tensor:
        return put_own(self.queries[rows] @ self.videos[cols].t(), self.own, self.query_video, rows, cols)


def put_own(tile, own, query_video, rows: slice, cols: slice):
    """``tile`` (rows x cols of a score matrix, a fresh tensor) with each query's ``own`` score
    written at its ground-truth video where that lies in the tile."""
    qv = query_video[rows]
    inside = ((qv >= cols.start) & (qv < cols.stop)).nonzero().squeeze(1)
    tile[inside, qv[inside] - cols.start] = own[rows][inside]
    return tile


def tiles(shape, chunk_size):
    """(rows, cols) slices of the ``chunk_size`` x ``chunk_size`` tiles of a matrix of ``shape``."""
    for r in range(0, shape[0], chunk_size):
        for c in range(0, shape[1], chunk_size):
            yield slice(r, min(r + chunk_size, shape[0])), slice(c, min(c + chunk_size, shape[1]))


def rank_scores(scores, tie_break: str = "averaging", total_queries: int | None = None,
                chunk_size: int = 4096) -> dict[str, dict[str, float]]:
    """t2v and v2t metrics of ``scores`` (MatrixScores, EmbeddingScores or a re-ranking of them),
    which hold a [Q, V] matrix, ``query_video`` [Q] and each query's ground-truth score ``own`` [Q].

    One pass over tiles of ``chunk_size`` x ``chunk_size`` scores gives both directions' counts:
    t2v compares each row with its query's own score; v2t compares each column with its video's
    best caption score, the maximum of its queries' own scores, known before the pass. Every tie
    rule gives a rank that is non-increasing in the score, so the rank at the best caption score
    is the video's rank.
    """
    _check_tie_break(tie_break)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    (num_q, num_v), own, query_video = scores.shape, scores.own, scores.query_video
    if own.isnan().any():
        raise ValueError("a ground-truth score is NaN")
    best = torch.full((num_v,), float("-inf"), dtype=own.dtype, device=own.device)
    best = best.scatter_reduce(0, query_video, own, reduce="amax")
    # The video's own captions at its best score: every one of them is a correct answer.
    at_best = torch.zeros(num_v, dtype=torch.int32, device=own.device)
    at_best = at_best.scatter_add(0, query_video, (own == best[query_video]).int())
    t2v_above, t2v_tied = (torch.zeros(num_q, dtype=torch.int32, device=own.device) for _ in range(2))
    v2t_above, v2t_tied = (torch.zeros(num_v, dtype=torch.int32, device=own.device) for _ in range(2))
    counts = _fused_tile_counts if num_q * num_v >= COMPILE_MIN_SCORES else _tile_counts
    for rows, cols in tiles(scores.shape, chunk_size):
        above_r, tied_r, above_c, tied_c = counts(scores.tile(rows, cols), own[rows, None], best[None, cols])
        t2v_above[rows] += above_r
        t2v_tied[rows] += tied_r
        v2t_above[cols] += above_c
        v2t_tied[cols] += tied_c
    has_query = at_best > 0  # videos without any caption are not ranked
    return {"t2v": _summarise(t2v_above.cpu(), t2v_tied.cpu(), torch.ones(num_q, dtype=torch.int32),
                              tie_break, total_queries),
            "v2t": _summarise(v2t_above[has_query].cpu(), v2t_tied[has_query].cpu(), at_best[has_query].cpu(),
                              tie_break, total_queries)}


def retrieval_metrics(sims: torch.Tensor, query_video: torch.Tensor, tie_break: str = "averaging",
                      total_queries: int | None = None, chunk_size: int = 4096) -> dict[str, dict[str, float]]:
    """Compute t2v and v2t retrieval metrics.

    sims: [Q, V] query-to-video similarities; query_video: [Q] index of each query's ground-truth
    video. Tiles of ``chunk_size`` x ``chunk_size`` are processed one at a time, so only
    tile-sized temporaries are allocated.
    """
    return rank_scores(MatrixScores(sims, query_video), tie_break, total_queries, chunk_size)


def retrieval_metrics_from_embeddings(queries: torch.Tensor, videos: torch.Tensor, query_video: torch.Tensor,
                                      tie_break: str = "averaging", total_queries: int | None = None,
                                      chunk_size: int = 4096) -> dict[str, dict[str, float]]:
    """``retrieval_metrics(queries @ videos.T, ...)`` without ever holding the [Q, V] matrix.

    queries: [Q, D]; videos: [V, D]; query_video: [Q]. The work runs on the device of the
    embeddings (a GPU in practice), one [chunk_size, chunk_size] tile of scores at a time; each
    score is computed once (see EmbeddingScores for how the ground-truth scores are kept exact).
    """
    return rank_scores(EmbeddingScores(queries, videos, query_video), tie_break, total_queries, chunk_size)


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


def mean_rows(languages):
    """The means over languages that a summary holds besides the languages: name -> languages left out."""
    means = {"mean": ()}
    if ENGLISH in languages and len(languages) > 1:
        means[f"mean_no_{ENGLISH}"] = (ENGLISH,)
    return means


def with_mean_rows(per_lang: dict[str, dict]) -> dict[str, dict]:
    """Per-language metrics followed by their ``mean_rows``."""
    summary = dict(per_lang)
    for name, exclude in mean_rows(per_lang).items():
        summary[name] = mean_over_languages(per_lang, exclude=exclude)
    return summary


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


def format_side_by_side(variants: dict[str, dict], direction="t2v", stats=("R1", "R5", "R10", "MedR")) -> str:
    """The ``format_table`` of each summary in ``variants`` ({label: summary}), side by side under
    its label; summaries without ``direction`` are left out."""
    blocks = []
    for label, summary in variants.items():
        present = {row: metrics for row, metrics in summary.items() if direction in metrics}
        if present:
            lines = [label, *format_table(present, direction, stats).splitlines()]
            width = max(map(len, lines))
            blocks.append([line.ljust(width) for line in lines])
    height = max(map(len, blocks), default=0)
    return "\n".join(" | ".join(block[i] if i < len(block) else " " * len(block[0]) for block in blocks).rstrip()
                     for i in range(height))
