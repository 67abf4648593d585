"""Test-time re-ranking: each re-ranker computed by hand on small matrices, through the tiles
that large sets use, from saved files, and through test.py."""
import json
import math

import numpy as np
import pytest
import torch

from model.metric import EmbeddingScores, MatrixScores, rank_scores, retrieval_metrics
from model.rerank import DualSoftmax, QueryBankNorm, best_videos


def _t(rows):
    return torch.tensor(rows, dtype=torch.float64)


def test_dual_softmax_by_hand():
    # q0 describes v1 but scores v0 higher; v0 is also q1's, which claims it more strongly.
    sims = _t([[0.6, 0.5], [0.7, 0.2]])
    query_video = torch.tensor([1, 0])
    t = 0.1
    # t2v: s * exp(s / t) / sum over the queries of the column.
    col = [math.exp(6) + math.exp(7), math.exp(5) + math.exp(2)]
    t2v = _t([[0.6 * math.exp(6) / col[0], 0.5 * math.exp(5) / col[1]],
              [0.7 * math.exp(7) / col[0], 0.2 * math.exp(2) / col[1]]])
    # v2t: the softmax runs over the videos of the row.
    row = [math.exp(6) + math.exp(5), math.exp(7) + math.exp(2)]
    v2t = _t([[0.6 * math.exp(6) / row[0], 0.5 * math.exp(5) / row[0]],
              [0.7 * math.exp(7) / row[1], 0.2 * math.exp(2) / row[1]]])
    out = DualSoftmax(t).metrics(MatrixScores(sims, query_video))
    assert out["t2v"] == retrieval_metrics(t2v, query_video)["t2v"]
    assert out["v2t"] == retrieval_metrics(v2t, query_video)["v2t"]
    assert retrieval_metrics(sims, query_video)["t2v"]["R1"] == 50.0 and out["t2v"]["R1"] == 100.0


def test_querybank_norm_by_hand():
    # v0 is a hub: both bank captions (and q0, which describes v1) score it highest.
    sims = _t([[0.8, 0.7, 0.1],    # q0 -> v1, best v0 (activated): normalised
               [0.9, 0.2, 0.1],    # q1 -> v0, best v0 (activated): normalised
               [0.1, 0.2, 0.5]])   # q2 -> v2, best v2 (no bank caption's best): raw
    query_video = torch.tensor([1, 0, 2])
    bank = _t([[0.9, 0.3, 0.2], [0.85, 0.75, 0.1]])
    beta = 10.0
    norm = [sum(math.exp(beta * b[j]) for b in bank.tolist()) for j in range(3)]
    expected = _t([[math.exp(beta * s) / norm[j] for j, s in enumerate(sims[0].tolist())],
                   [math.exp(beta * s) / norm[j] for j, s in enumerate(sims[1].tolist())],
                   sims[2].tolist()])
    out = QueryBankNorm(beta).metrics(MatrixScores(sims, query_video), bank)
    assert set(out) == {"t2v"}  # text-to-video only, as published
    assert out["t2v"] == retrieval_metrics(expected, query_video)["t2v"]
    assert retrieval_metrics(sims, query_video)["t2v"]["R1"] == pytest.approx(200 / 3)
    assert out["t2v"]["R1"] == 100.0


def test_best_videos_takes_the_first_of_tied_maxima_across_tiles():
    sims = _t([[0.1, 0.5, 0.2, 0.5, 0.5], [0.3, 0.3, 0.3, 0.3, 0.3], [0.0, 0.0, 0.0, 0.0, 0.9]])
    scores = MatrixScores(sims, torch.tensor([0, 1, 2]))
    for chunk_size in (1, 2, 3, 4096):
        assert best_videos(scores, chunk_size).tolist() == [1, 0, 4]


@pytest.mark.parametrize("reranker", [DualSoftmax(0.05), QueryBankNorm(20.0)], ids=["dsl", "qbnorm"])
def test_tiles_and_embeddings_give_the_materialised_result(reranker):
    gen = torch.Generator().manual_seed(0)
    # Quantised embeddings: exact scores, with ties.
    queries, videos, bank = (torch.randint(-2, 3, (n, 6), generator=gen).double() for n in (70, 50, 30))
    query_video = torch.randint(0, 50, (70,), generator=gen)
    expected = reranker.metrics(MatrixScores(queries @ videos.t(), query_video), bank @ videos.t())
    for chunk_size in (8, 4096):
        out = reranker.metrics(EmbeddingScores(queries, videos, query_video), bank @ videos.t(),
                               chunk_size=chunk_size)
        for direction in expected:
            assert out[direction] == pytest.approx(expected[direction])
    assert expected != {d: rank_scores(MatrixScores(queries @ videos.t(), query_video))[d] for d in expected}


def _eval_cfg(**changes):
    from config_keys import KEYS
    cfg = {name.split(".", 1)[1]: key.default for name, key in KEYS.items() if name.startswith("eval.")}
    return {**cfg, **changes}


def test_rerankers_from_config_name_the_key_of_a_wrong_value():
    from parse_config import ConfigError
    from trainer.evaluate import rerankers_from_config
    assert rerankers_from_config(_eval_cfg()) == []
    built = rerankers_from_config(_eval_cfg(rerank=["qbnorm", "dsl", "qbnorm"], rerank_dsl_temperature=0.5))
    assert [r.name for r in built] == ["qbnorm", "dsl"] and built[1].temperature == 0.5
    with pytest.raises(ConfigError, match=r"'eval.rerank': unknown re-ranker\(s\) csls; expected names among dsl, qbnorm"):
        rerankers_from_config(_eval_cfg(rerank=["dsl", "csls"]))
    with pytest.raises(ConfigError, match="'eval.rerank_qbnorm_beta' = 0.0 must be positive"):
        rerankers_from_config(_eval_cfg(rerank=["qbnorm"], rerank_qbnorm_beta=0.0))


def test_querybanks_per_language_or_one_stated_mix(toy_assets):
    from data_loader.readers import read_corpus
    from parse_config import ConfigError
    from trainer.evaluate import draw_querybanks
    corpus = read_corpus(toy_assets["train"], "multi-msrvtt", "2d", "train")
    own = draw_querybanks(corpus, ["de", "fr"], _eval_cfg(rerank_qbnorm_bank_size=50), seed=0)
    assert {lang: {cl for cl, _ in bank} for lang, bank in own.items()} == {"de": {"de"}, "fr": {"fr"}}
    de_captions = {c for caps in corpus.captions["de"] for c in caps}
    assert len(own["de"]) == 50 and len(set(own["de"])) == 50 and {c for _, c in own["de"]} <= de_captions
    assert own == draw_querybanks(corpus, ["de", "fr"], _eval_cfg(rerank_qbnorm_bank_size=50), seed=0)
    mix = draw_querybanks(corpus, ["de", "fr"], _eval_cfg(rerank_qbnorm_bank_size=51,
                                                           rerank_qbnorm_bank_languages=["en", "zh"]), seed=0)
    assert mix["de"] is mix["fr"] and [cl for cl, _ in mix["de"]] == ["en"] * 26 + ["zh"] * 25
    everything = draw_querybanks(corpus, ["de"], _eval_cfg(rerank_qbnorm_bank_size=10**6), seed=0)
    assert len(everything["de"]) == sum(len(caps) for caps in corpus.captions["de"])  # capped at what exists
    with pytest.raises(ConfigError, match="'eval.rerank_qbnorm_bank_languages'.*no captions in xx"):
        draw_querybanks(corpus, ["de"], _eval_cfg(rerank_qbnorm_bank_languages=["en", "xx"]), seed=0)


def test_offline_reranking_refuses_a_folder_without_what_it_needs(tmp_path, capsys):
    from utils import rerank as offline
    np.save(tmp_path / "de.npy", np.eye(3, dtype=np.float32))
    (tmp_path / "de.json").write_text(json.dumps({"query_ids": ["a", "b", "c"], "video_ids": ["a", "b", "c"]}))
    assert offline.main([str(tmp_path), "--rerank", "dsl"]) == 0
    assert "DSL (T=0.01, softmax over all test queries)" in capsys.readouterr().out
    assert offline.main([str(tmp_path), "--rerank", "qbnorm"]) == 2
    assert "de.querybank.npy: missing" in capsys.readouterr().err
    assert offline.main([str(tmp_path), "--rerank", "dsl,csls"]) == 2
    assert "unknown re-ranker(s) csls" in capsys.readouterr().err
