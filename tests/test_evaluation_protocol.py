"""The evaluation protocol: the config's tie rule and R@K denominator reach the evaluation that runs,
captions and videos sharing an id are grouped as ``eval.multi_caption`` says, and the summary's
mean rows average the languages they name."""
import pytest
import torch

from model.model import model_from_config
from tests.conftest import make_trainer, toy_config
from trainer.build import build_loaders, load_corpora
from trainer.evaluate import evaluate, metric_names, metrics_from_scores, score_languages

N_EVAL = 48  # videos (one caption per language each) of the toy evaluation set in conftest
RECALLS = ("R1", "R5", "R10", "R50")
LANGUAGES = ["en", "de", "fr", "zh"]  # four of the toy's nine languages keep evaluation quick


@pytest.fixture(scope="module")
def toy_eval(toy_assets, tmp_path_factory):
    """A fresh (untrained, seed 0) tiny model and the toy evaluation loader, built once."""
    tmp = tmp_path_factory.mktemp("eval_protocol")
    config = toy_config(toy_assets, tmp, languages=LANGUAGES)
    corpora = load_corpora(config, splits=("eval",))
    torch.manual_seed(0)
    model, tokenizer = model_from_config(config)
    _, loader = build_loaders(config, corpora, tokenizer)
    languages = corpora["eval"].languages
    assert languages == LANGUAGES
    # The default protocol's summary (averaging ties, R@K over the ranked queries), shared by tests.
    plain = evaluate(model, loader, languages, config["eval"], torch.device("cpu"))
    return {"tmp": tmp, "model": model, "loader": loader, "languages": languages, "plain": plain}


def eval_section(toy_assets, tmp, **flat):
    """The resolved ``eval`` section of a toy config with ``flat`` overrides."""
    return toy_config(toy_assets, tmp, languages=LANGUAGES, **flat)["eval"]


def identical_videos(model, monkeypatch):
    """Make every video embedding the first unit vector: each query then scores every video with
    exactly the same number (its first coordinate), so every ground truth ties with all videos."""
    def encode_video(video, mask):
        out = torch.zeros(len(video), model.embedding_dim)
        out[:, 0] = 1.0
        return out
    monkeypatch.setattr(model, "encode_video", encode_video)


# 48 videos all tied: the ground truth sits anywhere in positions 0..47.
OPTIMISTIC = {"R1": 100.0, "R5": 100.0, "R10": 100.0, "R50": 100.0, "MedR": 1.0, "MeanR": 1.0}
PESSIMISTIC = {"R1": 0.0, "R5": 0.0, "R10": 0.0, "R50": 100.0, "MedR": 48.0, "MeanR": 48.0}
AVERAGING = {"R1": 100 / 48, "R5": 500 / 48, "R10": 1000 / 48, "R50": 100.0, "MedR": 24.5, "MeanR": 24.5}


@pytest.mark.parametrize("tie_break,expected", [("optimistic", OPTIMISTIC), ("pessimistic", PESSIMISTIC),
                                                ("averaging", AVERAGING)])
def test_evaluate_ranks_ties_by_the_configs_tie_break(toy_eval, toy_assets, monkeypatch, tie_break, expected):
    identical_videos(toy_eval["model"], monkeypatch)
    cfg = eval_section(toy_assets, toy_eval["tmp"], **{"eval.tie_break": tie_break})
    summary = evaluate(toy_eval["model"], toy_eval["loader"], toy_eval["languages"], cfg, torch.device("cpu"))
    for lang in [*toy_eval["languages"], "mean", "mean_no_en"]:
        t2v = summary[lang]["t2v"]
        assert t2v["num_queries"] == N_EVAL, lang
        for stat, value in expected.items():
            assert t2v[stat] == pytest.approx(value, abs=1e-9), (lang, stat)


def test_trainer_evaluation_uses_the_configs_tie_break_and_total_queries(toy_assets, tmp_path, monkeypatch):
    """The same through the Trainer built from a config (train.py's path): pessimistic ranks, and R@K
    divided by eval.total_queries."""
    config = toy_config(toy_assets, tmp_path, **{"eval.tie_break": "pessimistic",
                                                 "eval.total_queries": 2 * N_EVAL,
                                                 "languages": ["en", "de"]})
    trainer, _ = make_trainer(config)
    identical_videos(trainer.model, monkeypatch)
    summary = trainer.evaluate()
    assert set(summary) == {"en", "de", "mean", "mean_no_en"}
    for lang in ("en", "de"):
        t2v = summary[lang]["t2v"]
        assert t2v["num_queries"] == N_EVAL
        # 48 hits at K = 50 over a denominator of 96 queries; ranks are 47 (pessimistic), not 23.5.
        assert (t2v["R1"], t2v["R10"], t2v["R50"], t2v["MedR"], t2v["MeanR"]) == (0.0, 0.0, 50.0, 48.0, 48.0)


def test_evaluate_divides_recall_by_the_configs_total_queries(toy_eval, toy_assets):
    """total_queries = twice the queries: every R@K halves, MedR / MeanR and the query count stay."""
    run = (toy_eval["model"], toy_eval["loader"], toy_eval["languages"])
    plain = toy_eval["plain"]
    doubled = evaluate(*run, eval_section(toy_assets, toy_eval["tmp"], **{"eval.total_queries": 2 * N_EVAL}),
                       torch.device("cpu"))
    assert set(doubled) == set(plain) == {*toy_eval["languages"], "mean", "mean_no_en"}
    nonzero = 0
    for lang in plain:
        for direction in ("t2v", "v2t"):
            a, b = plain[lang][direction], doubled[lang][direction]
            assert a["num_queries"] == b["num_queries"] == N_EVAL
            assert b["MedR"] == a["MedR"] and b["MeanR"] == a["MeanR"]
            for stat in RECALLS:
                assert b[stat] == pytest.approx(a[stat] / 2, rel=1e-12, abs=1e-12), (lang, direction, stat)
                nonzero += a[stat] > 0
    assert nonzero > 10  # the untrained model does retrieve something: halving is visible


# Hand-made evaluation set: items 0 and 2 share the id "a"; item 1 ("b") has two captions, so its
# two (item, caption) pairs are rows 1 and 2. Rows: (item 0), (item 1, cap 0), (item 1, cap 1), (item 2).
ITEM_IDS = ["a", "b", "a"]
ITEMS = torch.tensor([0, 1, 1, 2])
VIDEOS = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [-1.0, 2.0]])
# a: mean of (1, 0) and (-1, 2) = (0, 1); b: (1, 0)
GROUPED_VIDEOS = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
TEXTS = {
    # separately: row 0 (a) scores b higher, row 1 (b) scores a higher: misses; rows 2 and 3 hit.
    # averaged: a -> ((2, 1) + (-2, 1)) / 2 = (0, 1), b -> ((1, 2) + (1, -2)) / 2 = (1, 0): both hit.
    "en": torch.tensor([[2.0, 1.0], [1.0, 2.0], [1.0, -2.0], [-2.0, 1.0]]),
    # only items 0 and 2 (id a) have a German caption; (3, 2) misses, (-1, 2) hits, their mean (1, 2) hits.
    "de": torch.tensor([[3.0, 2.0], [9.0, 9.0], [9.0, 9.0], [-1.0, 2.0]]),
}
HAS = {"en": torch.tensor([True, True, True, True]), "de": torch.tensor([True, False, False, True])}


def hand_scores(multi_caption):
    return score_languages(TEXTS, VIDEOS, ITEMS, HAS, ITEM_IDS, multi_caption)


@pytest.mark.parametrize("multi_caption", ["average", "separate"])
def test_videos_sharing_an_id_are_averaged(multi_caption):
    scores = hand_scores(multi_caption)
    for lang in ("en", "de"):
        assert scores[lang].video_ids == ["a", "b"]
        torch.testing.assert_close(scores[lang].videos, GROUPED_VIDEOS, rtol=0, atol=1e-7)


def test_average_turns_the_captions_of_an_id_into_one_query():
    scores = hand_scores("average")
    en, de = scores["en"], scores["de"]
    assert en.query_ids == ["a", "b"] and en.query_video.tolist() == [0, 1]
    torch.testing.assert_close(en.queries, torch.tensor([[0.0, 1.0], [1.0, 0.0]]), rtol=0, atol=1e-7)
    # rows without a German caption are left out: one query, the mean of rows 0 and 3
    assert de.query_ids == ["a"] and de.query_video.tolist() == [0]
    torch.testing.assert_close(de.queries, torch.tensor([[1.0, 2.0]]) / 5 ** 0.5, rtol=0, atol=1e-7)
    summary = metrics_from_scores(scores, "optimistic")
    assert (summary["en"]["t2v"]["num_queries"], summary["en"]["t2v"]["R1"], summary["en"]["t2v"]["MedR"]) == \
        (2, 100.0, 1.0)
    assert (summary["en"]["v2t"]["num_queries"], summary["en"]["v2t"]["R1"]) == (2, 100.0)
    assert (summary["de"]["t2v"]["num_queries"], summary["de"]["t2v"]["R1"]) == (1, 100.0)


def test_separate_ranks_every_caption():
    scores = hand_scores("separate")
    en, de = scores["en"], scores["de"]
    assert en.query_ids == ["a", "b", "b", "a"] and en.query_video.tolist() == [0, 1, 1, 0]
    torch.testing.assert_close(en.queries, TEXTS["en"] / 5 ** 0.5, rtol=0, atol=1e-7)
    assert de.query_ids == ["a", "a"] and de.query_video.tolist() == [0, 0]
    summary = metrics_from_scores(scores, "optimistic")
    t2v = summary["en"]["t2v"]
    # rows 0 and 1 put the wrong video first (rank 1), rows 2 and 3 the right one (rank 0)
    assert (t2v["num_queries"], t2v["R1"], t2v["R5"], t2v["MedR"], t2v["MeanR"]) == (4, 50.0, 100.0, 1.5, 1.5)
    # v2t: video a's best own captions (rows 0 and 3, 1/sqrt 5) are beaten by row 1 (2/sqrt 5), and
    # video b's (rows 1 and 2, 1/sqrt 5) by row 0 (2/sqrt 5): both at rank 1.
    v2t = summary["en"]["v2t"]
    assert (v2t["num_queries"], v2t["R1"], v2t["MedR"]) == (2, 0.0, 2.0)
    assert (summary["de"]["t2v"]["num_queries"], summary["de"]["t2v"]["R1"]) == (2, 50.0)


# Three languages with known retrieval: English right for both videos, German wrong for both,
# French right for one.
def three_language_scores():
    videos = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    texts = {"en": torch.tensor([[1.0, 0.1], [0.1, 1.0]]),
             "de": torch.tensor([[0.1, 1.0], [1.0, 0.1]]),
             "fr": torch.tensor([[1.0, 0.1], [1.0, 0.2]])}
    has = {lang: torch.ones(2, dtype=torch.bool) for lang in texts}
    return score_languages(texts, videos, torch.tensor([0, 1]), has, ["x", "y"], "average")


def test_mean_rows_by_hand():
    summary = metrics_from_scores(three_language_scores(), "optimistic")
    assert [summary[lang]["t2v"]["R1"] for lang in ("en", "de", "fr")] == [100.0, 0.0, 50.0]
    assert [summary[lang]["t2v"]["MedR"] for lang in ("en", "de", "fr")] == [1.0, 2.0, 1.5]
    assert summary["mean"]["t2v"]["R1"] == pytest.approx(50.0)
    assert summary["mean"]["t2v"]["MedR"] == pytest.approx(1.5)
    assert summary["mean_no_en"]["t2v"]["R1"] == pytest.approx(25.0)
    assert summary["mean_no_en"]["t2v"]["MedR"] == pytest.approx(1.75)


def test_mean_rows_match_the_per_language_values_of_a_real_evaluation(toy_eval, toy_assets):
    languages = toy_eval["languages"]
    summary = toy_eval["plain"]
    assert languages[0] == "en" and set(summary) == {*languages, "mean", "mean_no_en"}
    others = [lang for lang in languages if lang != "en"]
    differs = 0
    for direction in ("t2v", "v2t"):
        for stat in ("R1", "R5", "R10", "R50", "MedR", "MeanR", "num_queries"):
            mean = sum(summary[lang][direction][stat] for lang in languages) / len(languages)
            no_en = sum(summary[lang][direction][stat] for lang in others) / len(others)
            assert summary["mean"][direction][stat] == pytest.approx(mean, rel=1e-12), (direction, stat)
            assert summary["mean_no_en"][direction][stat] == pytest.approx(no_en, rel=1e-12), (direction, stat)
            differs += abs(mean - no_en) > 1e-6
    assert differs >= 6  # English does differ from the others' average, so the two rows are told apart


def test_mean_rows_exist_only_where_they_mean_something():
    scores = three_language_scores()
    assert set(metrics_from_scores(scores, "optimistic")) == {"en", "de", "fr", "mean", "mean_no_en"}
    no_english = {lang: s for lang, s in scores.items() if lang != "en"}
    summary = metrics_from_scores(no_english, "optimistic")
    assert set(summary) == {"de", "fr", "mean"} and summary["mean"]["t2v"]["R1"] == 25.0
    assert set(metrics_from_scores({"en": scores["en"]}, "optimistic")) == {"en", "mean"}
    assert "t2v_mean_no_en_R1" in metric_names(["en", "de"]) and "t2v_mean_no_en_R1" not in metric_names(["de"])
