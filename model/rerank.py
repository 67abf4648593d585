"""Test-time re-ranking of retrieval scores, reported beside the raw numbers, never instead of them.

Both methods re-score with data beyond the query and the video, so each result carries a label
saying which method ran and on what data.

* ``DualSoftmax`` (DSL; Cheng et al., 2021, "Improving Video-Text Retrieval by Multi-Stream Corpus
  Alignment and Dual Softmax Loss"): s'(q, v) = s(q, v) * exp(s(q, v) / T) / sum_q' exp(s(q', v) / T),
  the score re-weighted by a softmax over all test queries; for video-to-text the roles swap and
  the softmax runs over the videos. It needs the whole test query set at once.
* ``QueryBankNorm`` (QB-Norm; Bogolin et al., CVPR 2022) with its dynamic inverted softmax: with a
  bank B of training captions, a query whose best video is the best video of some bank caption is
  re-scored s'(q, v) = exp(beta s(q, v)) / sum_b exp(beta s(b, v)); the other queries keep their
  raw scores. Text-to-video only, as published (the bank holds captions).

Scores come as ``model.metric`` score objects (a materialised matrix or embeddings, read tile by
tile), so re-ranking never needs the [Q, V] matrix either.
"""
import torch

from model.metric import put_own, rank_scores, tiles


class Rescored:
    """The scores of ``base`` mapped by ``fn(scores, rows, cols)``, an elementwise function of a
    score and the row and column indices it sits at (broadcastable index tensors)."""

    def __init__(self, base, fn):
        self.base, self.fn = base, fn
        self.shape, self.device, self.query_video = base.shape, base.device, base.query_video
        self.own = fn(base.own, torch.arange(base.shape[0], device=base.device), base.query_video)

    def tile(self, rows: slice, cols: slice) -> torch.Tensor:
        r = torch.arange(rows.start, rows.stop, device=self.device)[:, None]
        c = torch.arange(cols.start, cols.stop, device=self.device)[None]
        # The re-scored ground truths are written back, so that ranks compare against one value.
        return put_own(self.fn(self.base.tile(rows, cols), r, c), self.own, self.query_video, rows, cols)


class DualSoftmax:
    name = "dsl"
    data = "all test queries"
    needs_querybank = False

    def __init__(self, temperature: float):
        self.temperature = temperature

    def label(self):
        return f"DSL (T={self.temperature:g}, softmax over {self.data})"

    def metrics(self, scores, bank_sims=None, tie_break="averaging", total_queries=None, chunk_size=4096):
        """``bank_sims`` is not read: the dual softmax normalises over the test queries."""
        num_q, num_v = scores.shape
        t = self.temperature
        # log sum exp(s / T) over the queries of each video and over the videos of each query.
        over_queries = torch.full((num_v,), float("-inf"), dtype=scores.own.dtype, device=scores.device)
        over_videos = torch.full((num_q,), float("-inf"), dtype=scores.own.dtype, device=scores.device)
        for rows, cols in tiles(scores.shape, chunk_size):
            logits = scores.tile(rows, cols) / t
            over_queries[cols] = torch.logaddexp(over_queries[cols], logits.logsumexp(0))
            over_videos[rows] = torch.logaddexp(over_videos[rows], logits.logsumexp(1))
        t2v = Rescored(scores, lambda s, r, c: s * torch.exp(s / t - over_queries[c]))
        v2t = Rescored(scores, lambda s, r, c: s * torch.exp(s / t - over_videos[r]))
        return {"t2v": rank_scores(t2v, tie_break, total_queries, chunk_size)["t2v"],
                "v2t": rank_scores(v2t, tie_break, total_queries, chunk_size)["v2t"]}


class QueryBankNorm:
    name = "qbnorm"
    data = "a querybank of training captions"
    needs_querybank = True

    def __init__(self, beta: float):
        self.beta = beta

    def label(self, bank="a querybank"):
        return f"QB-Norm (beta={self.beta:g}, {bank}; t2v only)"

    def metrics(self, scores, bank_sims: torch.Tensor, tie_break="averaging", total_queries=None, chunk_size=4096):
        """``bank_sims``: [bank captions, V] scores of the bank against the same videos."""
        if bank_sims.dim() != 2 or bank_sims.shape[1] != scores.shape[1] or not len(bank_sims):
            raise ValueError(f"the querybank similarities must be [bank size > 0, {scores.shape[1]} videos], "
                             f"got {tuple(bank_sims.shape)}")
        bank_sims = bank_sims.to(device=scores.device, dtype=scores.own.dtype)
        log_norm = (self.beta * bank_sims).logsumexp(0)
        # The activation set: videos that are some bank caption's best match.
        activated = torch.zeros(scores.shape[1], dtype=torch.bool, device=scores.device)
        activated[bank_sims.argmax(1)] = True
        active = activated[best_videos(scores, chunk_size)]
        beta = self.beta
        normed = Rescored(scores, lambda s, r, c: torch.where(active[r], beta * s - log_norm[c], s))
        # exp(beta s) / Z ranks as its logarithm does; only rows are compared, so mixing normalised
        # and raw rows is sound for text-to-video.
        return {"t2v": rank_scores(normed, tie_break, total_queries, chunk_size)["t2v"]}


RERANKERS = {r.name: r for r in (DualSoftmax, QueryBankNorm)}


def build_rerankers(names, dsl_temperature, qbnorm_beta):
    """The re-rankers ``names`` lists (each once, in its order); an unknown name is a ValueError."""
    names = list(dict.fromkeys(names))
    unknown = [str(n) for n in names if n not in RERANKERS]
    if unknown:
        raise ValueError(f"unknown re-ranker(s) {', '.join(unknown)}; expected names among {', '.join(RERANKERS)}")
    parameter = {"dsl": dsl_temperature, "qbnorm": qbnorm_beta}
    return [RERANKERS[n](parameter[n]) for n in names]


def best_videos(scores, chunk_size=4096):
    """[Q] each query's best-scoring video (the first one on a tie)."""
    num_q = scores.shape[0]
    top = torch.full((num_q,), float("-inf"), dtype=scores.own.dtype, device=scores.device)
    index = torch.zeros(num_q, dtype=torch.long, device=scores.device)
    for rows, cols in tiles(scores.shape, chunk_size):
        tile = scores.tile(rows, cols)
        where = tile.argmax(1)
        value = tile.gather(1, where[:, None]).squeeze(1)
        better = value > top[rows]  # strictly: an earlier tile keeps a tie
        top[rows] = torch.where(better, value, top[rows])
        index[rows] = torch.where(better, where + cols.start, index[rows])
    return index
