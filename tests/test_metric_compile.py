"""The compiled tile counts are compiled before a ranking pass and reused by every tile of it."""

import torch
from torch._dynamo.utils import counters

from model.metric import _fused_tile_counts, _tile_counts


def test_a_pass_reuses_the_counts_compiled_beforehand():
    gen = torch.Generator().manual_seed(0)
    # Compiled once for square tiles and once for the others, as utils.benchmark does before timing.
    for cols in (64, 48):
        tile = torch.randn(64, cols, generator=gen)
        _fused_tile_counts(tile, tile[:, 0].clone()[:, None], tile[0].clone()[None])
    graphs = counters["stats"]["unique_graphs"]
    # A pass's references are views of the whole [N] vectors (rank_scores: own[rows, None], best[None, cols]).
    own, best = torch.randn(100, generator=gen), torch.randn(90, generator=gen)
    for rows, cols in ((slice(0, 40), slice(0, 40)), (slice(40, 100), slice(40, 90)), (slice(40, 100), slice(0, 40))):
        tile = torch.randn(rows.stop - rows.start, cols.stop - cols.start, generator=gen)
        tile[:, :3] = own[rows, None]  # ties with the references, so equal counts are exercised
        fused = _fused_tile_counts(tile, own[rows, None], best[None, cols])
        eager = _tile_counts(tile, own[rows, None], best[None, cols])
        assert all(torch.equal(f, e) for f, e in zip(fused, eager))
    assert counters["stats"]["unique_graphs"] == graphs, "the pass compiled the counts again"
