import numpy as np
import pytest
import torch

from model.metric import format_table, mean_over_languages, retrieval_metrics


def _t(rows):
    return torch.tensor(rows, dtype=torch.float64)


def _q(ids):
    return torch.tensor(ids, dtype=torch.long)


def test_perfect_diagonal():
    sims = torch.eye(4) + 0.1 * torch.arange(4.0)  # diagonal strictly largest in every row and column
    out = retrieval_metrics(sims, _q([0, 1, 2, 3]))
    expected = {"R1": 100.0, "R5": 100.0, "R10": 100.0, "R50": 100.0,
                "MedR": 1.0, "MeanR": 1.0, "num_queries": 4.0}
    assert out["t2v"] == expected
    assert out["v2t"] == expected
    assert all(type(v) is float for d in out.values() for v in d.values())


def test_query_with_gt_at_rank_two():
    sims = _t([[0.9, 0.1, 0.2, 0.3],
               [0.1, 0.8, 0.6, 0.2],
               [0.7, 0.6, 0.5, 0.1],
               [0.2, 0.1, 0.3, 0.9]])
    out = retrieval_metrics(sims, _q([0, 1, 2, 3]), tie_break="optimistic")
    # t2v ranks: q0 0, q1 0, q2 2 (0.7 and 0.6 beat 0.5), q3 0 -> [0, 0, 2, 0]
    # R1 = 3/4; MedR = median(0,0,0,2) + 1 = 1; MeanR = 2/4 + 1 = 1.5
    assert out["t2v"] == {"R1": 75.0, "R5": 100.0, "R10": 100.0, "R50": 100.0,
                          "MedR": 1.0, "MeanR": 1.5, "num_queries": 4.0}
    # v2t: column v2 = [0.2, 0.6, 0.5, 0.3]; q2's 0.5 is beaten by q1's 0.6 -> rank 1; others 0
    # ranks [0, 0, 1, 0]: R1 = 75, MedR = 1, MeanR = 1/4 + 1 = 1.25
    assert out["v2t"] == {"R1": 75.0, "R5": 100.0, "R10": 100.0, "R50": 100.0,
                          "MedR": 1.0, "MeanR": 1.25, "num_queries": 4.0}


@pytest.mark.parametrize("tie_break, rank", [("optimistic", 1.0), ("pessimistic", 3.0), ("averaging", 2.0)])
def test_gt_tied_with_two_other_videos(tie_break, rank):
    # GT is video 2 (0.5); 0.9 is strictly greater (1), videos 1 and 3 tie with it (2 others).
    # optimistic 1, pessimistic 1 + 2 = 3, averaging 1 + 2/2 = 2
    sims = _t([[0.9, 0.5, 0.5, 0.5, 0.1]])
    out = retrieval_metrics(sims, _q([2]), tie_break=tie_break)
    assert out["t2v"]["MedR"] == rank + 1
    assert out["t2v"]["MeanR"] == rank + 1
    assert out["t2v"]["R1"] == 0.0
    assert out["t2v"]["R5"] == 100.0


@pytest.mark.parametrize("tie_break, r1, r5, medr", [
    ("optimistic", 100.0, 100.0, 1.0),   # rank 0
    ("pessimistic", 0.0, 100.0, 3.0),    # rank 0 + 2 tied others = 2
    ("averaging", 100.0 / 3, 100.0, 2.0),  # positions 0, 1, 2 equally likely: R@1 1/3; rank 0 + 2/2 = 1
])
def test_three_way_tie_at_the_top(tie_break, r1, r5, medr):
    sims = _t([[0.5, 0.5, 0.5, 0.1, 0.0]])
    out = retrieval_metrics(sims, _q([0]), tie_break=tie_break)
    assert out["t2v"]["R1"] == pytest.approx(r1, rel=1e-12)
    assert out["t2v"]["R5"] == r5
    assert out["t2v"]["MedR"] == medr


@pytest.mark.parametrize("tie_break, r1, medr", [
    ("optimistic", 100.0, 1.0),   # rank 0
    ("pessimistic", 0.0, 2.0),    # rank 0 + 1 tied other = 1
    ("averaging", 50.0, 1.5),     # positions 0 and 1 equally likely: R@1 1/2; rank 0 + 1/2
])
def test_two_way_tie_at_the_top(tie_break, r1, medr):
    out = retrieval_metrics(_t([[0.5, 0.5, 0.2]]), _q([0]), tie_break=tie_break)
    assert out["t2v"]["R1"] == r1
    assert out["t2v"]["MedR"] == medr
    assert out["t2v"]["MeanR"] == medr


def test_averaging_is_the_expectation_over_random_tie_breaks():
    # q0: GT 0.5 below 0.9, 0.8, 0.7 (a = 3) and tied with 3 others (m = 4): positions 3..6.
    #     R@1 0, R@5 = 2/4 (positions 3, 4 of 3..6), R@10 1; rank 3 + 3/2 = 4.5
    # q1: GT tied at the top with one other (a = 0, m = 2): R@1 1/2, R@5 1; rank 0.5
    # q2: GT strictly best: R@1 1; rank 0
    sims = _t([[0.9, 0.8, 0.7, 0.5, 0.5, 0.5, 0.5, 0.1],
               [0.1, 0.6, 0.6, 0.2, 0.0, 0.0, 0.0, 0.0],
               [0.0, 0.0, 0.9, 0.1, 0.0, 0.0, 0.0, 0.0]])
    out = retrieval_metrics(sims, _q([3, 2, 2]), tie_break="averaging")
    assert out["t2v"]["R1"] == pytest.approx(100.0 * (0 + 0.5 + 1) / 3, rel=1e-12)
    assert out["t2v"]["R5"] == pytest.approx(100.0 * (0.5 + 1 + 1) / 3, rel=1e-12)
    assert out["t2v"]["R10"] == 100.0
    assert out["t2v"]["MedR"] == 0.5 + 1
    assert out["t2v"]["MeanR"] == pytest.approx((4.5 + 0.5 + 0) / 3 + 1, rel=1e-12)
    # With a denominator of 4, the missing query counts as a miss.
    out4 = retrieval_metrics(sims, _q([3, 2, 2]), tie_break="averaging", total_queries=4)
    assert out4["t2v"]["R5"] == pytest.approx(100.0 * (0.5 + 1 + 1) / 4, rel=1e-12)


def test_total_queries_counts_missing_as_failures():
    sims = _t([[0.9, 0.1],
               [0.8, 0.2],
               [0.3, 0.7]])
    out = retrieval_metrics(sims, _q([0, 0, 1]), total_queries=4)
    # t2v: all 3 queries at rank 0, denominator 4 -> R@K = 75; MedR/MeanR over the 3 ranked only
    assert out["t2v"] == {"R1": 75.0, "R5": 75.0, "R10": 75.0, "R50": 75.0,
                          "MedR": 1.0, "MeanR": 1.0, "num_queries": 3.0}
    # v2t: both videos at rank 0 (0.9 tops column 0, 0.7 tops column 1), denominator 4 -> 50
    assert out["v2t"]["R1"] == 50.0
    assert out["v2t"]["num_queries"] == 2.0


def test_v2t_min_over_two_captions_per_video():
    sims = _t([[0.2, 0.8],
               [0.9, 0.1],
               [0.5, 0.4],
               [0.3, 0.6]])
    out = retrieval_metrics(sims, _q([0, 0, 1, 1]))
    # v0 column [0.2, 0.9, 0.5, 0.3]: captions q0 (rank 3), q1 (rank 0) -> 0
    # v1 column [0.8, 0.1, 0.4, 0.6]: captions q2 (0.8, 0.6 above -> 2), q3 (0.8 above -> 1) -> 1
    # ranks [0, 1]: R1 = 50, MedR = median(0, 1) + 1 = 1.5, MeanR = 1.5
    assert out["v2t"] == {"R1": 50.0, "R5": 100.0, "R10": 100.0, "R50": 100.0,
                          "MedR": 1.5, "MeanR": 1.5, "num_queries": 2.0}
    # t2v: q0 0.2 < 0.8 -> 1, q1 0, q2 0.4 < 0.5 -> 1, q3 0 -> ranks [1, 0, 1, 0]
    assert out["t2v"] == {"R1": 50.0, "R5": 100.0, "R10": 100.0, "R50": 100.0,
                          "MedR": 1.5, "MeanR": 1.5, "num_queries": 4.0}


@pytest.mark.parametrize("tie_break, rank, hit", [("optimistic", 0.0, 1.0), ("pessimistic", 1.0, 0.0),
                                                  ("averaging", 1 / 3, 2 / 3)])
def test_v2t_ties_with_the_videos_other_captions_are_not_against_it(tie_break, rank, hit):
    # column v0 = [0.5, 0.5, 0.5]: its best caption score ties with q1 (also v0's: a correct answer
    # too) and q2 (v1's). In a random order of the three, the first of v0's two comes after the
    # wrong one with chance 1/3: expected rank 1/3, R@1 2/3.
    sims = _t([[0.5, 0.1], [0.5, 0.2], [0.5, 0.9]])
    out = retrieval_metrics(sims, _q([0, 0, 1]), tie_break=tie_break)
    # v1 column [0.1, 0.2, 0.9]: q2 on top -> rank 0, a hit
    assert out["v2t"]["MeanR"] == (rank + 0.0) / 2 + 1
    assert out["v2t"]["R1"] == pytest.approx(100.0 * (hit + 1) / 2, rel=1e-12)
    assert out["v2t"]["num_queries"] == 2.0


def test_v2t_averaging_is_the_expectation_over_every_order_of_the_tied_captions():
    """Exhaustively: each video's tied captions (its own and others') in every order; the rank and
    the hit at K of the first correct caption, averaged over the orders."""
    import itertools
    # columns: v0 has 2 of 4 tied captions, v1 3 of 5 below one better, v2 1 of 3 (the t2v rule)
    sims = torch.zeros(9, 3, dtype=torch.float64)
    query_video = _q([0, 0, 1, 1, 1, 2, 2, 2, 2])
    sims[:, 0] = _t([0.7, 0.7, 0.1, 0.7, 0.7, 0.2, 0.2, 0.2, 0.2])
    sims[:, 1] = _t([0.9, 0.1, 0.5, 0.5, 0.5, 0.5, 0.1, 0.1, 0.5])
    sims[:, 2] = _t([0.4, 0.1, 0.1, 0.4, 0.1, 0.4, 0.2, 0.2, 0.2])
    out = retrieval_metrics(sims, query_video, tie_break="averaging")["v2t"]
    expected_rank, expected_hits = [], {k: [] for k in (1, 5, 10)}
    for v in range(3):
        column, best = sims[:, v], sims[query_video == v, v].max()
        above = int((column > best).sum())
        tied = [bool(query_video[q] == v) for q in range(9) if column[q] == best]
        firsts = [above + order.index(True) for order in itertools.permutations(tied)]
        expected_rank.append(sum(firsts) / len(firsts))
        for k in expected_hits:
            expected_hits[k].append(sum(f < k for f in firsts) / len(firsts))
    assert out["MeanR"] == pytest.approx(sum(expected_rank) / 3 + 1, rel=1e-12)
    for k, hits in expected_hits.items():
        assert out[f"R{k}"] == pytest.approx(100 * sum(hits) / 3, rel=1e-12)
    assert expected_hits[1] == pytest.approx([1 - 2 / 4, 0.0, 1 / 3])  # v0: 2 of 4 tied at the top are its own
    assert expected_hits[5][1] == 1.0 and expected_rank[1] == pytest.approx(1 + 2 / 4)


def test_videos_without_queries_are_skipped_in_v2t():
    sims = _t([[0.9, 0.3, 0.1],
               [0.2, 0.8, 0.95]])
    out = retrieval_metrics(sims, _q([0, 1]))
    # video 2 has no caption; v0 and v1 are each topped by their own caption -> 2 ranked, both rank 0
    assert out["v2t"]["num_queries"] == 2.0
    assert out["v2t"]["R1"] == 100.0
    # t2v: q1 has 0.95 above its GT 0.8 -> ranks [0, 1], R1 = 50
    assert out["t2v"]["R1"] == 50.0


def test_invalid_tie_break_raises():
    with pytest.raises(ValueError, match="random.*optimistic.*pessimistic.*averaging"):
        retrieval_metrics(torch.eye(2), _q([0, 1]), tie_break="random")


def test_total_queries_smaller_than_ranked_raises():
    with pytest.raises(ValueError, match="total_queries"):
        retrieval_metrics(torch.eye(3), _q([0, 1, 2]), total_queries=2)


@pytest.mark.parametrize("tie_break", ["optimistic", "pessimistic", "averaging"])
def test_chunk_size_does_not_change_result(tie_break):
    gen = torch.Generator().manual_seed(0)
    sims = torch.randint(0, 6, (50, 40), generator=gen).float()  # coarse values -> many ties
    query_video = torch.randint(0, 40, (50,), generator=gen)  # some videos get no query
    default = retrieval_metrics(sims, query_video, tie_break=tie_break)
    assert default == retrieval_metrics(sims, query_video, tie_break=tie_break, chunk_size=1)
    assert default == retrieval_metrics(sims, query_video, tie_break=tie_break, chunk_size=7)
    assert default["v2t"]["num_queries"] == float(query_video.unique().numel())


def _reference(sims, query_video):
    """Sort-based reference: 0-based rank = position of the GT in the descending-sorted row/column."""
    order = np.argsort(-sims, axis=1, kind="stable")
    t2v = np.array([np.where(order[q] == query_video[q])[0][0] for q in range(len(sims))])
    col_order = np.argsort(-sims, axis=0, kind="stable")
    v2t = np.array([min(np.where(col_order[:, v] == q)[0][0] for q in np.where(query_video == v)[0])
                    for v in range(sims.shape[1]) if (query_video == v).any()])

    def stats(r):
        return {**{f"R{k}": 100.0 * (r < k).mean() for k in (1, 5, 10, 50)},
                "MedR": np.median(r) + 1, "MeanR": r.mean() + 1, "num_queries": float(len(r))}
    return {"t2v": stats(t2v), "v2t": stats(v2t)}


def test_matches_sort_based_reference_without_ties():
    rng = np.random.default_rng(1)
    sims = rng.standard_normal((120, 80))  # continuous -> no ties
    query_video = np.arange(120) % 80  # 40 videos with two captions
    expected = _reference(sims, query_video)
    for tie_break in ("optimistic", "pessimistic", "averaging"):
        out = retrieval_metrics(torch.from_numpy(sims), torch.from_numpy(query_video), tie_break=tie_break)
        for direction in ("t2v", "v2t"):
            assert out[direction] == pytest.approx(expected[direction])
    assert 0.0 < expected["t2v"]["R10"] < 100.0  # the reference case is non-trivial


def test_mean_over_languages_with_exclude():
    def m(r1, medr):
        return {"t2v": {"R1": r1, "MedR": medr}, "v2t": {"R1": r1 / 2, "MedR": medr}}
    per_lang = {"en": m(60.0, 1.0), "de": m(40.0, 3.0), "fr": m(20.0, 6.0)}
    # all: R1 (60+40+20)/3 = 40, MedR (1+3+6)/3 = 10/3; v2t R1 (30+20+10)/3 = 20
    mean_all = mean_over_languages(per_lang)
    assert mean_all["t2v"] == pytest.approx({"R1": 40.0, "MedR": 10 / 3})
    assert mean_all["v2t"] == pytest.approx({"R1": 20.0, "MedR": 10 / 3})
    # without en: R1 (40+20)/2 = 30, MedR (3+6)/2 = 4.5; v2t R1 (20+10)/2 = 15
    assert mean_over_languages(per_lang, exclude=("en",)) == {
        "t2v": {"R1": 30.0, "MedR": 4.5}, "v2t": {"R1": 15.0, "MedR": 4.5}}
    assert mean_over_languages(per_lang, exclude=("en", "de", "fr")) == {}


def test_format_table():
    per_lang = {"en": {"t2v": {"R1": 12.345, "MedR": 7.0}},
                "mean": {"t2v": {"R1": 100.0, "MedR": 1.25}}}
    table = format_table(per_lang, stats=("R1", "MedR"))
    # columns: width 4 for names (left), 5 for R1, 4 for MedR (right), two spaces between
    assert table.splitlines() == ["t2v      R1  MedR",
                                  "en     12.3   7.0",
                                  "mean  100.0   1.2"]


# ---- retrieval_metrics_from_embeddings: the same numbers without the [Q, V] matrix ----------

from model.metric import retrieval_metrics_from_embeddings  # noqa: E402


def _embeddings(num_q, num_v, dim, seed, levels=None, dtype=torch.float64):
    """Random embeddings; with ``levels`` they are small integers, so every score is exact and many
    scores tie."""
    gen = torch.Generator().manual_seed(seed)
    if levels is None:
        return (torch.randn(num_q, dim, generator=gen, dtype=dtype),
                torch.randn(num_v, dim, generator=gen, dtype=dtype))
    return (torch.randint(-levels, levels + 1, (num_q, dim), generator=gen).to(dtype),
            torch.randint(-levels, levels + 1, (num_v, dim), generator=gen).to(dtype))


@pytest.mark.parametrize("tie_break", ["optimistic", "pessimistic", "averaging"])
@pytest.mark.parametrize("levels", [None, 1])
def test_from_embeddings_matches_materialised_matrix(tie_break, levels):
    queries, videos = _embeddings(90, 70, 6, seed=2, levels=levels)
    gen = torch.Generator().manual_seed(5)
    query_video = torch.randint(0, 70, (90,), generator=gen)  # several captions per video, some videos none
    expected = retrieval_metrics(queries @ videos.t(), query_video, tie_break=tie_break)
    for chunk_size in (1, 7, 64, 4096):
        out = retrieval_metrics_from_embeddings(queries, videos, query_video, tie_break=tie_break,
                                                chunk_size=chunk_size)
        assert out == expected
    if levels is not None:  # the quantised case really has ties at the ground truth
        sims = queries @ videos.t()
        gt = sims.gather(1, query_video[:, None])
        assert ((sims == gt).sum(1) > 1).any()
        if tie_break == "averaging":  # ...that straddle a cut-off, so fractional hits are compared too
            bounds = [retrieval_metrics(sims, query_video, tie_break=tb) for tb in ("pessimistic", "optimistic")]
            for direction in ("t2v", "v2t"):
                assert any(bounds[0][direction][k] < expected[direction][k] < bounds[1][direction][k]
                           for k in ("R1", "R5", "R10"))


def test_from_embeddings_ties_change_the_result():
    queries, videos = _embeddings(60, 60, 4, seed=3, levels=1)
    query_video = torch.arange(60)
    outs = {tb: retrieval_metrics_from_embeddings(queries, videos, query_video, tie_break=tb, chunk_size=16)
            for tb in ("optimistic", "pessimistic")}
    assert outs["optimistic"]["t2v"]["MeanR"] < outs["pessimistic"]["t2v"]["MeanR"]
    assert outs["optimistic"]["v2t"]["MeanR"] < outs["pessimistic"]["v2t"]["MeanR"]


def test_from_embeddings_multi_caption_v2t_by_hand():
    # 2-D embeddings; scores are the rows of sims below (queries @ videos.T).
    queries = _t([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [2.0, 0.0]])
    videos = _t([[1.0, 0.0], [0.0, 1.0]])
    # sims = [[1, 0], [0, 1], [1, 1], [2, 0]]; q0, q1 describe v0; q2, q3 describe v1
    query_video = _q([0, 0, 1, 1])
    out = retrieval_metrics_from_embeddings(queries, videos, query_video, tie_break="optimistic", chunk_size=1)
    # v0 column [1, 0, 1, 2]: best caption q0 (1) has q3's 2 above -> rank 1
    # v1 column [0, 1, 1, 0]: best caption q2 (1), nothing strictly above -> rank 0
    assert out["v2t"]["MeanR"] == 1.5 and out["v2t"]["R1"] == 50.0
    # t2v: q0 1 vs 0 -> 0; q1 0 vs 1 -> 1; q2 1 vs 1 tie -> 0; q3 0 vs 2 -> 1
    assert out["t2v"]["MeanR"] == 1.5
    assert out == retrieval_metrics(queries @ videos.t(), query_video, tie_break="optimistic")


def test_from_embeddings_float32_and_total_queries():
    queries, videos = _embeddings(300, 120, 16, seed=4, dtype=torch.float32)
    query_video = torch.arange(300) % 120
    expected = retrieval_metrics(queries @ videos.t(), query_video, total_queries=400)
    for chunk_size in (32, 100, 4096):
        out = retrieval_metrics_from_embeddings(queries, videos, query_video, total_queries=400,
                                                chunk_size=chunk_size)
        # float32 products of different shapes may round differently; with continuous random
        # embeddings a rounding-level near tie at a ground truth is vanishingly unlikely.
        for direction in ("t2v", "v2t"):
            assert out[direction] == pytest.approx(expected[direction])
    assert expected["t2v"]["num_queries"] == 300.0 and expected["t2v"]["R50"] < 100.0 * 300 / 400


def test_from_embeddings_integer_inputs_and_empty_queries():
    queries, videos = _embeddings(20, 10, 3, seed=6, levels=2, dtype=torch.float64)
    query_video = torch.arange(20) % 10
    expected = retrieval_metrics(queries.long() @ videos.long().t(), query_video)
    assert retrieval_metrics_from_embeddings(queries.long(), videos.long(), query_video, chunk_size=3) == expected
    empty = retrieval_metrics_from_embeddings(torch.zeros(0, 3), videos.float(), torch.zeros(0, dtype=torch.long))
    assert empty["t2v"]["num_queries"] == 0.0 and empty["v2t"]["num_queries"] == 0.0


def test_from_embeddings_rejects_bad_input():
    queries, videos = _embeddings(4, 3, 2, seed=0)
    with pytest.raises(ValueError, match="dimension"):
        retrieval_metrics_from_embeddings(queries, videos[:, :1], _q([0, 1, 2, 0]))
    with pytest.raises(ValueError, match="entries"):
        retrieval_metrics_from_embeddings(queries, videos, _q([0, 1]))
    with pytest.raises(ValueError, match="lie in"):
        retrieval_metrics_from_embeddings(queries, videos, _q([0, 1, 2, 3]))
    with pytest.raises(ValueError, match="chunk_size"):
        retrieval_metrics_from_embeddings(queries, videos, _q([0, 1, 2, 0]), chunk_size=0)
    with pytest.raises(ValueError, match="random"):
        retrieval_metrics_from_embeddings(queries, videos, _q([0, 1, 2, 0]), tie_break="random")
    with pytest.raises(ValueError, match="NaN"):
        retrieval_metrics_from_embeddings(queries * float("nan"), videos, _q([0, 1, 2, 0]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_from_embeddings_on_cuda_matches_cpu():
    queries, videos = _embeddings(200, 150, 8, seed=7, levels=1)
    query_video = torch.arange(200) % 150
    expected = retrieval_metrics(queries @ videos.t(), query_video)
    out = retrieval_metrics_from_embeddings(queries.cuda(), videos.cuda(), query_video.cuda(), chunk_size=64)
    assert out == expected


# ---- one-pass ranking: each score computed once, both directions counted from it -------------

@pytest.mark.parametrize("tie_break", ["optimistic", "pessimistic", "averaging"])
def test_one_pass_equals_the_two_pass_ranking_it_replaced(tie_break):
    from utils.benchmark.ranking import two_pass_ranks
    for seed in range(3):
        # Quantised embeddings: every score exact, many ties at the ground truth.
        queries, videos = _embeddings(130, 90, 5, seed=seed, levels=1, dtype=torch.float32)
        query_video = torch.randint(0, 90, (130,), generator=torch.Generator().manual_seed(seed))
        for chunk_size in (7, 32, 4096):
            expected = two_pass_ranks(queries, videos, query_video, chunk_size=chunk_size, tie_break=tie_break)
            assert retrieval_metrics_from_embeddings(queries, videos, query_video, tie_break=tie_break,
                                                     chunk_size=chunk_size) == expected
            assert retrieval_metrics(queries @ videos.t(), query_video, tie_break=tie_break,
                                     chunk_size=chunk_size) == expected


def test_fused_tile_counts_equal_the_eager_ones():
    import warnings
    from model.metric import _fused_tile_counts, _tile_counts
    scores = torch.randint(0, 4, (400, 300), generator=torch.Generator().manual_seed(0)).float()
    # A contiguous tile and a strided view (a tile of a materialised matrix), references taken from them.
    for tile in (scores[:256].clone(), scores[17:290, 33:250]):
        row_ref, col_ref = tile[:, 3:4].clone(), tile[5:6].clone()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fused = _fused_tile_counts(tile, row_ref, col_ref)
        # A failed compilation would fall back to the eager counts, with this warning.
        assert not [w for w in caught if "without torch.compile" in str(w.message)]
        eager = _tile_counts(tile, row_ref, col_ref)
        assert all(torch.equal(f, e) for f, e in zip(fused, eager))
        assert eager[1].min() >= 1 and eager[1].max() > 1  # the references tie with other scores


def test_ground_truth_scores_round_as_the_matrix_product_does():
    """The ground truths are computed before the pass; they equal the materialised matrix's
    entries bit for bit (a row-by-row dot product would not), so float32 metrics are identical."""
    from model.metric import EmbeddingScores
    queries, videos = _embeddings(700, 300, 64, seed=8, dtype=torch.float32)
    query_video = torch.randint(0, 300, (700,), generator=torch.Generator().manual_seed(8))
    sims = queries @ videos.t()
    expected = sims[torch.arange(700), query_video]
    assert torch.equal(EmbeddingScores(queries, videos, query_video).own, expected)
    assert not torch.equal((queries * videos[query_video]).sum(1), expected)  # the dot product rounds otherwise
    assert retrieval_metrics_from_embeddings(queries, videos, query_video, chunk_size=128) == \
        retrieval_metrics(sims, query_video)
