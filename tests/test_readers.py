"""Readers of every released layout and of the safe layout, conversion, and the `check` tool.

Fixtures write small files in each released layout, with its quirks: Czech stored as `cz` in
YouCook2, RUDDER items lacking languages, a 968-video Multi-MSRVTT test file scored against 1000
queries. Retrieval denominators are checked through the project's own evaluation code.
"""
import json
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from data_loader import check, convert
from data_loader.readers import (READERS, detect_feature_key, detect_layout, fill_missing_captions, read_corpus,
                                 read_safe)
from data_loader.dataset import EnglishReading, RetrievalDataset, TextInput
from data_loader.safe_pickle import DataFileError
from trainer.evaluate import metrics_from_scores, score_languages

ROOT = Path(__file__).resolve().parents[1]
MSRVTT_LANGS = ["en", "de", "fr", "cs", "zh", "ru", "vi", "sw", "es"]
YC_FILE_LANGS = ["de", "fr", "cz", "zh", "ru", "vi", "es", "en", "ja"]   # as stored in the released files


def frames(rng, n, dim):
    return rng.standard_normal((n, dim)).astype(np.float32)


def dump(path, items):
    path.write_bytes(pickle.dumps(items))
    return path


def msrvtt_items(n, split, key="2d", dim=8, langs=MSRVTT_LANGS, captions_per_item=3, seed=0):
    rng = np.random.default_rng(seed)
    items = []
    for i in range(n):
        item = {"id": f"video{i}", key: frames(rng, 3 + i % 5, dim), "audio": rng.random((40, 10))}
        for lang in langs:
            if split == "train":
                item[f"caption_{lang}"] = [f"{lang} caption {k} of video {i}" for k in range(captions_per_item)]
            else:
                item[f"eval_caption_{lang}"] = f"{lang} test caption of video {i}"
        items.append(item)
    return items


def youcook2_items(n, key="s3d", dim=16, missing=None, seed=0):
    rng = np.random.default_rng(seed)
    items = []
    for i in range(n):
        item = {"id": 1000 + i, key: frames(rng, 2 + i % 4, dim), "audio": rng.random((40, 7)),
                "caption": f"chop the onion {i}"}
        for lang in YC_FILE_LANGS:
            if (i, lang) != missing:
                item[f"caption_{lang}"] = f"{lang} clip {i}"
        item["caption_en"] = item["caption"]
        items.append(item)
    return items


RUDDER_CAPTIONS = [  # per item, in the order of its `captions` dict
    {"en": "a man waves", "hi": "hi 0", "mr": "mr 0", "kn": "kn 0"},
    {"hi": "hi 1", "en": "a girl sings", "kn": "kn 1"},                       # no mr
    {"mr": "mr 2", "hi": "hi 2"},                                             # no en, no kn
    {"en": "a dog runs", "kn": "kn 3", "ta": "ta 3"},                         # no hi, no mr; ta unused
    {"kn": "kn 4", "en": "a cat sleeps", "hi": "hi 4", "mr": "mr 4"},
]


def rudder_items(seed=0, dim=8):
    rng = np.random.default_rng(seed)
    return [{"id": f"r{i}", "2d": frames(rng, 4, dim), "captions": dict(caps),
             "audios": {lang: rng.random((40, 5)) for lang in caps}}
            for i, caps in enumerate(RUDDER_CAPTIONS)]


class WordTokenizer:
    """Stands in for a Hugging Face tokenizer: one id per word, padded to max_length."""

    def __call__(self, texts, padding, truncation, max_length, return_tensors, return_token_type_ids):
        ids = np.zeros((len(texts), max_length), dtype=np.int64)
        mask = np.zeros_like(ids)
        for r, text in enumerate(texts):
            words = text.split()[:max_length]
            ids[r, :len(words)] = [1 + (hash(w) % 1000) for w in words]
            mask[r, :len(words)] = 1
        return {"input_ids": ids, "attention_mask": mask}


def perfect_eval(corpus, total_queries=None):
    """Evaluate a model that retrieves every query's own video: only the denominators matter."""
    ds = RetrievalDataset(corpus, [TextInput("student", WordTokenizer(), corpus.languages)],
                          max_words=8, n_video_tokens=4, train=False)
    entries = [ds[j] for j in range(len(ds))]
    items = torch.tensor([e.index for e in entries])
    one_hot = torch.eye(len(corpus))
    texts = {lang: one_hot[items] for lang in corpus.languages}
    has = {lang: torch.tensor([e.has_caption[lang] for e in entries]) for lang in corpus.languages}
    scores = score_languages(texts, one_hot[items], items, has, corpus.ids, "average")
    return metrics_from_scores(scores, "optimistic", total_queries)


# ---- Multi-MSRVTT and VATEX (layout multi-msrvtt) ------------------------------------------------

@pytest.mark.parametrize("key, dim", [("2d", 512), ("s3d", 1024)])
def test_multi_msrvtt_clip_and_s3d(tmp_path, key, dim):
    train = dump(tmp_path / "train.pkl", msrvtt_items(6, "train", key, dim))
    test = dump(tmp_path / "test.pkl", msrvtt_items(5, "eval", key, dim))
    c = read_corpus(train, "multi-msrvtt", key, "train")
    assert c.languages[0] == "en" and sorted(c.languages) == sorted(MSRVTT_LANGS)
    assert c.feature_dim == dim and c.features[0].dtype == np.float32
    assert c.ids == [f"video{i}" for i in range(6)]
    assert c.captions["de"][2] == [f"de caption {k} of video 2" for k in range(3)]
    e = read_corpus(test, "multi-msrvtt", key, "eval", languages=MSRVTT_LANGS)
    assert e.languages == MSRVTT_LANGS
    assert e.captions["sw"][4] == ["sw test caption of video 4"]
    assert "audio" not in e.extras[0]


def test_vatex_en_zh(tmp_path):
    train = dump(tmp_path / "vatex_train.pkl", msrvtt_items(4, "train", langs=["en", "zh"], captions_per_item=10))
    test = dump(tmp_path / "vatex_test.pkl", msrvtt_items(7, "eval", langs=["en", "zh"]))
    c = read_corpus(train, "multi-msrvtt", "2d", "train")
    assert c.languages == ["en", "zh"] and len(c.captions["zh"][0]) == 10
    e = read_corpus(test, "multi-msrvtt", "2d", "eval")
    out = perfect_eval(e)   # VATEX: no total_queries, the denominator is the file's own videos
    assert out["zh"]["t2v"]["R1"] == 100.0 and out["zh"]["t2v"]["num_queries"] == 7


def test_msrvtt_968_videos_scored_against_1000(tmp_path, capsys):
    langs = ["en", "de", "sw"]
    test = dump(tmp_path / "msrvtt_jsfusion_test_multilingual.pkl", msrvtt_items(968, "eval", dim=4, langs=langs))
    corpus = read_corpus(test, "multi-msrvtt", "2d", "eval")
    out = perfect_eval(corpus, total_queries=1000)
    for lang in langs:
        assert out[lang]["t2v"]["R1"] == pytest.approx(96.8)
        assert out[lang]["t2v"]["num_queries"] == 968
    assert out["mean"]["t2v"]["R1"] == pytest.approx(96.8)
    with pytest.raises(ValueError, match="smaller than"):   # the denominator can never hide queries
        perfect_eval(corpus, total_queries=900)
    assert check_main(capsys, test)[1].count("eval.total_queries = 1000") == 1


def test_msrvtt_parity_scores_against_1000_only_the_968_item_file(tmp_path):
    """The reference's MSR-VTT rule (docs/reference.md §1.6): 1000 for a file of 968 items, else the rows ranked."""
    from parse_config import load_flat, resolve
    from trainer.evaluate import recall_denominator
    parity = resolve(load_flat(ROOT / "configs" / "msrvtt" / "clip" / "parity.json"))["eval"]
    for n, expected in ((968, 1000), (20, None)):
        path = dump(tmp_path / f"test{n}.pkl", msrvtt_items(n, "eval", dim=4, langs=["en"]))
        assert recall_denominator(parity, read_corpus(path, "multi-msrvtt", "2d", "eval")) == expected


# ---- YouCook2 ------------------------------------------------------------------------------------

@pytest.mark.parametrize("key, dim", [("s3d", 1024), ("2d_raw", 512)])
def test_youcook2_reader(tmp_path, key, dim):
    path = dump(tmp_path / "youcook_val.pkl", youcook2_items(5, key, dim, missing=(3, "ja")))
    for split in ("train", "eval"):   # both splits read the same way
        c = read_corpus(path, "multi-youcook2", key, split)
        assert c.ids == [str(1000 + i) for i in range(5)]
        assert c.languages[0] == "en"
        assert sorted(c.languages) == sorted(["en", "de", "fr", "cs", "zh", "ru", "vi", "es", "ja"])
        assert "cz" not in c.languages and "sw" not in c.languages
        assert c.captions["cs"][1] == ["cz clip 1"]          # Czech stored as cz, exposed as cs
        assert c.captions["en"][2] == ["chop the onion 2"]   # English: the plain `caption`
        assert c.captions["ja"][3] == []                     # missing language: no caption
        assert c.feature_dim == dim
        assert all("audio" not in x and "caption_en" not in x for x in c.extras)


def test_youcook2_denominator_3350(tmp_path):
    path = dump(tmp_path / "yc.pkl", youcook2_items(10, missing=(3, "ja")))
    out = perfect_eval(read_corpus(path, "multi-youcook2", "s3d", "eval"), total_queries=3350)
    assert out["de"]["t2v"]["R1"] == pytest.approx(100 * 10 / 3350)
    assert out["ja"]["t2v"]["R1"] == pytest.approx(100 * 9 / 3350)   # the clip without ja is not a query
    assert out["ja"]["t2v"]["num_queries"] == 9


def test_youcook2_keeps_a_differing_caption_en(tmp_path):
    items = youcook2_items(2)
    items[1]["caption_en"] = "Chop the onion."
    c = read_corpus(dump(tmp_path / "yc.pkl", items), "multi-youcook2", "s3d", "train")
    assert c.captions["en"][1] == ["chop the onion 1"] and c.extras[1]["caption_en"] == "Chop the onion."
    assert "caption_en" not in c.extras[0]


def test_youcook2_student_english_from_caption_en_as_the_reference(tmp_path):
    """data.student_english = caption_en: the student reads 'caption_en', an English-input teacher
    'caption' (regex-cleaned where the recipe says so), as in the reference (docs/reference.md §1.2, §1.3)."""
    items = youcook2_items(2)
    items[1]["caption_en"] = "Chop the onion, finely."
    items[1]["caption"] = "Chop the onion; (coarsely)!"
    path = dump(tmp_path / "yc.pkl", items)
    shared = read_corpus(path, "multi-youcook2", "s3d", "train")
    split = read_corpus(path, "multi-youcook2", "s3d", "train", student_english="caption_en")
    assert shared.captions["en"][1] == ["Chop the onion; (coarsely)!"] and shared.teacher_english is None
    assert split.captions["en"][1] == ["Chop the onion, finely."]
    assert split.teacher_english[1] == ["Chop the onion; (coarsely)!"]
    tok = WordTokenizer()
    inputs = [TextInput("student", tok, ["en"]), TextInput("teacher", tok, ["en"], EnglishReading(True, True))]
    row = RetrievalDataset(split, inputs, max_words=8, n_video_tokens=4, train=False)[1].text
    expected = {name: tok([text], True, True, 8, "np", False)["input_ids"][0].tolist()
                for name, text in (("student", "Chop the onion, finely."), ("teacher", "Chop the onion coarsely"))}
    assert {name: row[name]["en"].input_ids.tolist() for name in expected} == expected


def test_check_warns_of_youcook2_english_captions_that_differ(tmp_path, capsys):
    items = youcook2_items(3)
    items[2]["caption_en"] = "Chop the onion."
    code, out, _ = check_main(capsys, dump(tmp_path / "yc.pkl", items), "--feature-key", "s3d")
    assert code == 0 and "1 items have a 'caption_en' that differs from their 'caption'" in out and "1002" in out
    assert check_main(capsys, dump(tmp_path / "same.pkl", youcook2_items(3)), "--strict")[0] == 0


# ---- RUDDER --------------------------------------------------------------------------------------

def test_rudder_missing_languages_are_empty(tmp_path):
    path = dump(tmp_path / "rudder_test.pkl", rudder_items())
    c = read_corpus(path, "rudder", "2d", "eval", languages=["en", "hi", "mr", "kn"])
    assert c.languages == ["en", "hi", "mr", "kn"]
    assert c.captions["en"] == [["a man waves"], ["a girl sings"], [], ["a dog runs"], ["a cat sleeps"]]
    assert c.captions["mr"] == [["mr 0"], [], ["mr 2"], [], ["mr 4"]]
    out = perfect_eval(c)
    assert {lang: out[lang]["t2v"]["num_queries"] for lang in c.languages} == {"en": 4, "hi": 4, "mr": 3, "kn": 4}
    assert all(out[lang]["t2v"]["R1"] == 100.0 for lang in c.languages)
    ds = RetrievalDataset(c, [TextInput("student", WordTokenizer(), c.languages)], 8, 4, train=True)
    assert ds[2].has_caption == {"en": False, "hi": True, "mr": True, "kn": False}
    assert ds[2].text["student"]["en"].attention_mask.sum() == 0


def test_rudder_reads_unused_languages_for_selection(tmp_path):
    c = read_corpus(dump(tmp_path / "r.pkl", rudder_items()), "rudder", "2d", "train")
    assert c.languages == ["en", "hi", "kn", "mr", "ta"]  # English first, then alphabetical
    assert c.captions["ta"][3] == ["ta 3"]


def test_rudder_last_available_fallback_matches_the_reference(tmp_path):
    path = dump(tmp_path / "rudder_test.pkl", rudder_items())
    c = read_corpus(path, "rudder", "2d", "eval", languages=["en", "hi", "mr", "kn"],
                    missing_caption_fallback="last_available")
    # item 1 {hi, en, kn}: mr <- kn (last in its dict); item 2 {mr, hi}: en, kn <- hi;
    # item 3 {en, kn, ta}: ta is not used, so hi, mr <- kn
    assert c.captions["mr"][1] == ["kn 1"]
    assert c.captions["en"][2] == ["hi 2"] and c.captions["kn"][2] == ["hi 2"]
    assert c.captions["hi"][3] == ["kn 3"] and c.captions["mr"][3] == ["kn 3"]
    assert c.extras[2]["filled_captions"] == {"en": "hi", "kn": "hi"}
    out = perfect_eval(c)
    assert all(out[lang]["t2v"]["num_queries"] == 5 for lang in c.languages)
    with pytest.raises(DataFileError, match="missing_caption_fallback"):
        fill_missing_captions(c, "first")


def test_rudder_teachers_read_the_first_available_language_of_an_item_without_english(tmp_path):
    """Under last_available, an item without English gives its student the last available language
    as English and its English-input teachers the first, as the reference's RUDDER loader did."""
    path = dump(tmp_path / "rudder_test.pkl", rudder_items())
    c = read_corpus(path, "rudder", "2d", "eval", languages=["en", "hi", "mr", "kn"],
                    missing_caption_fallback="last_available")
    tok = WordTokenizer()
    inputs = [TextInput("student", tok, ["en"]), TextInput("teacher", tok, ["en"], EnglishReading(True, False))]
    data = RetrievalDataset(c, inputs, max_words=8, n_video_tokens=4, train=False)
    read = {name: [data[j].text[name]["en"].input_ids.tolist() for j in range(len(data))]
            for name in ("student", "teacher")}
    ids = lambda text: tok([text], True, True, 8, "np", False)["input_ids"][0].tolist()  # noqa: E731
    english = [caps[0] for caps in c.captions["en"]]
    assert english[2] == "hi 2"  # item 2 {mr, hi}: its student's English is its last language
    assert read["student"] == [ids(text) for text in english]
    assert read["teacher"] == [ids("mr 2" if j == 2 else text) for j, text in enumerate(english)]
    unfilled = read_corpus(path, "rudder", "2d", "eval", languages=["en", "hi", "mr", "kn"])
    assert unfilled.teacher_english is None


def test_rudder_denominator_counts_the_file_items_as_the_reference(tmp_path):
    """eval.denominator = file_items divides R@K by the items of the file (the reference's len(data)),
    also when two items share an id and are averaged into one query; ranked divides by the queries."""
    from trainer.evaluate import recall_denominator
    items = rudder_items()
    items[4]["id"] = "r3"
    c = read_corpus(dump(tmp_path / "rudder_test.pkl", items), "rudder", "2d", "eval", languages=["en", "hi"])
    unset = {"total_queries": None, "total_queries_items": None}
    denominators = {mode: recall_denominator({**unset, "denominator": mode}, c) for mode in ("ranked", "file_items")}
    assert denominators == {"ranked": None, "file_items": 5}
    assert recall_denominator({"total_queries": 7, "total_queries_items": None, "denominator": "ranked"}, c) == 7
    out = perfect_eval(c, total_queries=denominators["file_items"])
    assert out["en"]["t2v"]["num_queries"] == 3  # items 0, 1 and 3+4 (one id); item 2 has no en
    assert out["en"]["t2v"]["R1"] == pytest.approx(100 * 3 / 5)
    assert perfect_eval(c)["en"]["t2v"]["R1"] == 100.0


# ---- detection -----------------------------------------------------------------------------------

def test_detect_layout_and_feature_key(tmp_path):
    cases = [(msrvtt_items(2, "train"), ("multi-msrvtt", "train"), "2d"),
             (msrvtt_items(2, "eval", key="s3d"), ("multi-msrvtt", "eval"), "s3d"),
             (youcook2_items(2, key="2d_raw"), ("multi-youcook2", "train"), "2d_raw"),
             (rudder_items(), ("rudder", "train"), "2d")]
    for items, layout, key in cases:
        assert detect_layout(items, "x") == layout
        assert detect_feature_key(items, "x") == key


# ---- safe layout and conversion ------------------------------------------------------------------

RELEASED = {
    "msrvtt_train": (lambda: msrvtt_items(5, "train"), "multi-msrvtt", "2d", "train"),
    "msrvtt_eval": (lambda: msrvtt_items(5, "eval", key="s3d", dim=16), "multi-msrvtt", "s3d", "eval"),
    "youcook2": (lambda: youcook2_items(4, key="2d_raw", missing=(1, "ja")), "multi-youcook2", "2d_raw", "eval"),
    "rudder": (lambda: rudder_items(), "rudder", "2d", "train"),
}


def assert_same(a, b):
    assert a.ids == b.ids and a.languages == b.languages and a.captions == b.captions
    assert all(np.array_equal(x, y) and y.dtype == np.float32 for x, y in zip(a.features, b.features))
    assert (a.extras or [{}] * len(a)) == b.extras


@pytest.mark.parametrize("name", sorted(RELEASED))
def test_conversion_round_trips(tmp_path, name, capsys):
    make, layout, key, split = RELEASED[name]
    src = dump(tmp_path / f"{name}.pkl", make())
    out = tmp_path / "safe"
    assert convert.main([str(src), str(out), "--layout", layout, "--feature-key", key, "--split", split]) == 0
    audio = "audios" if layout == "rudder" else "audio"  # arrays of the released items, not carried over
    assert f"not carried over (not plain data): {audio}\n" in capsys.readouterr().out
    original = read_corpus(src, layout, key, split)
    back = read_corpus(out, "safe", key, split)
    assert_same(original, back)
    assert (out / "captions.json").is_file() and (out / "features.safetensors").is_file()
    # detected layout, npy features: the same corpus
    out2 = tmp_path / "safe_npy"
    assert convert.main([str(src), str(out2), "--format", "npy"]) == 0
    assert_same(original, read_corpus(out2, "safe", key, split))
    # the fallback applies to converted data as to the original
    if layout == "rudder":
        a = read_corpus(src, layout, key, split, ["en", "hi", "mr", "kn"], "last_available")
        b = read_corpus(out, "safe", key, split, ["en", "hi", "mr", "kn"], "last_available")
        assert a.captions == b.captions


def test_convert_refuses_to_overwrite_and_float16(tmp_path, capsys):
    src = dump(tmp_path / "m.pkl", msrvtt_items(3, "train"))
    assert convert.main([str(src), str(tmp_path / "o")]) == 0
    assert convert.main([str(src), str(tmp_path / "o")]) == 2
    assert "--force" in capsys.readouterr().err
    assert convert.main([str(src), str(tmp_path / "o"), "--force", "--dtype", "float16"]) == 0
    from safetensors.numpy import load_file
    assert load_file(str(tmp_path / "o" / "features.safetensors"))["features"].dtype == np.float16  # stored so
    back = read_safe(tmp_path / "o")
    assert back.features[0].dtype == np.float32
    assert np.allclose(back.features[0], read_corpus(src, "multi-msrvtt", "2d", "train").features[0], atol=1e-2)


def test_safe_base_path_and_hand_written_files(tmp_path):
    from safetensors.numpy import save_file
    feats = np.arange(5 * 3, dtype=np.float32).reshape(5, 3)
    (tmp_path / "eval.json").write_text(json.dumps({
        "ids": ["a", "b", "c"], "feature_key": "clip",
        "captions": {"de": [["ein Hund"], [], ["eine Katze", "zwei Katzen"]], "en": [["a dog"], ["a man"], "a cat"]}}))
    save_file({"features": feats, "offsets": np.array([0, 2, 2, 5], dtype=np.int64)}, str(tmp_path / "eval.safetensors"))
    for given in (tmp_path / "eval", tmp_path / "eval.json"):
        c = read_corpus(given, "safe", "clip", "eval")
        assert c.languages == ["en", "de"] and c.ids == ["a", "b", "c"]
        assert c.captions["en"][2] == ["a cat"] and c.captions["de"][1] == []
        assert [f.shape[0] for f in c.features] == [2, 0, 3]
        assert np.array_equal(c.features[2], feats[2:5])
    with pytest.raises(DataFileError, match="data.feature_key"):
        read_corpus(tmp_path / "eval", "safe", "s3d", "eval")


def test_corpus_from_python_through_write_safe(tmp_path):
    from data_loader.corpus import Corpus
    rng = np.random.default_rng(1)
    corpus = Corpus(path="mine", ids=["x", "y"], features=[frames(rng, 3, 4), frames(rng, 1, 4)],
                    captions={"en": [["a"], ["b"]], "sw": [["mtu"], []]})
    convert.write_safe(corpus, tmp_path / "mine", "2d")
    assert_same(corpus, read_safe(tmp_path / "mine", "2d"))


# ---- check ---------------------------------------------------------------------------------------

def run_check(*args):
    """(exit status, stdout, stderr) of `python -m data_loader.check` in a subprocess."""
    proc = subprocess.run([sys.executable, "-m", "data_loader.check", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    return proc.returncode, proc.stdout, proc.stderr


def check_main(capsys, *args):
    code = check.main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_check_summarises_valid_files(tmp_path, capsys):
    path = dump(tmp_path / "train.pkl", msrvtt_items(6, "train", key="s3d", dim=16))
    code, out, err = check_main(capsys, path)
    assert code == 0 and err == "" and out.rstrip().endswith("ok")
    assert "multi-msrvtt, split train" in out and "items       6 (6 unique ids)" in out
    assert "'s3d': dim 16, stored float32, frames per video min 3 / median 4.5 / max 7" in out
    yc = dump(tmp_path / "yc.pkl", youcook2_items(3, missing=(0, "de")))
    code, out, _ = check_main(capsys, yc, "--layout", "multi-youcook2", "--feature-key", "s3d")
    assert code == 0 and "1 items have no 'de' caption" in out and "1000" in out
    assert check_main(capsys, yc, "--strict")[0] == 1


def test_check_flags_rudder_gaps_and_duplicates(tmp_path, capsys):
    items = rudder_items()
    items[4]["id"] = "r0"
    code, out, err = check_main(capsys, dump(tmp_path / "r.pkl", items), "--allow-duplicate-ids")
    assert code == 0
    assert "rudder" in out and "5 (4 unique ids)" in out
    assert "1 items have no 'en' caption (left out of that language's loss and evaluation): r2" in out
    assert "ids occur more than once" in out and "r0 x2" in out
    code, _, err = check_main(capsys, dump(tmp_path / "r.pkl", items), "--allow-duplicate-ids", "--strict")
    assert code == 1 and len(err.strip().splitlines()) == 1
    code, _, err = check_main(capsys, dump(tmp_path / "r.pkl", items))  # train.py refuses it so by default
    assert code == 2 and "ids occur more than once: r0 x2 (pass --allow-duplicate-ids" in err


def malformed_files(tmp_path):
    """name -> (arguments for check, expected exit status, text expected in the one-line reason)."""
    cases = {}
    (tmp_path / "garbage.pkl").write_bytes(b"\x00not a pickle at all")
    cases["garbage"] = ([tmp_path / "garbage.pkl"], 2, "not a readable pickle")

    class Evil:
        def __reduce__(self):
            return (subprocess.call, (["true"],))
    (tmp_path / "evil.pkl").write_bytes(pickle.dumps([{"id": 1, "2d": Evil()}]))
    cases["unsafe"] = ([tmp_path / "evil.pkl"], 2, "refused global")
    dump(tmp_path / "dict.pkl", {"id": 1})
    cases["not a list"] = ([tmp_path / "dict.pkl"], 2, "expected a list of dicts")
    dump(tmp_path / "nokey.pkl", msrvtt_items(2, "train"))
    cases["feature key"] = ([tmp_path / "nokey.pkl", "--feature-key", "s3d"], 2, "no feature key 's3d'")
    dump(tmp_path / "rudder.pkl", rudder_items())
    cases["wrong layout"] = ([tmp_path / "rudder.pkl", "--layout", "multi-youcook2"], 2, "no English 'caption'")
    items = msrvtt_items(3, "train")
    items[1]["caption_de"] = items[1]["caption_de"][:1]
    dump(tmp_path / "misaligned.pkl", items)
    cases["misaligned"] = ([tmp_path / "misaligned.pkl"], 2, "aligned by index")
    items = msrvtt_items(3, "eval")
    items[2]["2d"][1, 3] = np.nan
    dump(tmp_path / "nan.pkl", items)
    cases["nan"] = ([tmp_path / "nan.pkl"], 2, "NaN or inf features: video2")
    items = msrvtt_items(2, "eval")
    items[0]["2d"] = items[0]["2d"][0]
    dump(tmp_path / "shape.pkl", items)
    cases["1-d features"] = ([tmp_path / "shape.pkl", "--feature-key", "2d"], 2, "expected [frames, dim]")
    convert.main([str(dump(tmp_path / "ok.pkl", msrvtt_items(3, "eval"))), str(tmp_path / "safe_bad_json")])
    (tmp_path / "safe_bad_json" / "captions.json").write_text("{\"ids\": [")
    cases["bad json"] = ([tmp_path / "safe_bad_json"], 2, "not valid JSON")
    convert.main([str(tmp_path / "ok.pkl"), str(tmp_path / "safe_bad_offsets"), "--format", "npy"])
    np.save(tmp_path / "safe_bad_offsets" / "offsets.npy", np.array([0, 5, 3, 9], dtype=np.int64))
    cases["bad offsets"] = ([tmp_path / "safe_bad_offsets"], 2, "offsets must start at 0")
    convert.main([str(tmp_path / "ok.pkl"), str(tmp_path / "safe_short")])
    meta = json.loads((tmp_path / "safe_short" / "captions.json").read_text())
    meta["captions"]["de"] = meta["captions"]["de"][:2]
    (tmp_path / "safe_short" / "captions.json").write_text(json.dumps(meta))
    cases["short captions"] = ([tmp_path / "safe_short"], 2, "one entry per item")
    (tmp_path / "empty_dir").mkdir()
    cases["empty folder"] = ([tmp_path / "empty_dir"], 2, "no captions.json")
    cases["missing"] = ([tmp_path / "nowhere.pkl"], 2, "file not found")
    return cases


def test_check_rejects_malformed_files_in_one_line(tmp_path, capsys):
    for name, (args, status, reason) in malformed_files(tmp_path).items():
        code, out, err = check_main(capsys, *args)
        lines = err.strip().splitlines()
        assert code == status, (name, code, err)
        assert len(lines) == 1 and lines[0].startswith("error: ") and reason in lines[0], (name, err)


def test_check_command_line(tmp_path):
    path = dump(tmp_path / "r.pkl", rudder_items())
    code, out, err = run_check(path)
    assert code == 0 and "layout      rudder (detected: layout, feature key)" in out
    (tmp_path / "bad.pkl").write_bytes(b"junk")
    code, out, err = run_check(tmp_path / "bad.pkl")
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1


def test_every_layout_is_registered():
    assert {"multi-msrvtt", "multi-youcook2", "rudder", "safe"} <= set(READERS)


def test_configs_load_the_new_layouts(tmp_path):
    """The data section of a config reaches the new readers through the ordinary loader."""
    from data_loader.loaders import load_split
    from parse_config import resolve
    rudder = dump(tmp_path / "rudder.pkl", rudder_items())
    cfg = resolve({"data.layout": "rudder", "data.train_path": str(rudder), "data.eval_path": str(rudder),
                   "data.feature_key": "2d", "data.feature_dim": 8, "data.batch_size": 4,
                   "languages": ["en", "hi", "mr", "kn"]})
    corpus = load_split(cfg, "train")
    assert corpus.languages == ["en", "hi", "mr", "kn"] and corpus.captions["en"][2] == []
    convert.main([str(rudder), str(tmp_path / "safe")])
    cfg = resolve({"data.layout": "safe", "data.train_path": str(tmp_path / "safe"),
                   "data.eval_path": str(tmp_path / "safe"), "data.feature_key": "2d", "data.feature_dim": 8,
                   "data.batch_size": 4, "languages": ["en", "hi", "mr", "kn"]})
    assert load_split(cfg, "eval").captions == corpus.captions
    cfg["data"]["missing_caption_fallback"] = "last_available"
    assert load_split(cfg, "train").captions["en"][2] == ["hi 2"]


def test_a_reader_declares_the_reading_options_it_takes(tmp_path, monkeypatch):
    """data.student_english is taken by the layouts whose reader declares it, whatever their name,
    and refused in one line for the others."""
    import parse_config
    from data_loader import readers
    from parse_config import ConfigError, resolve
    options = dict(readers.READER_OPTIONS)  # the registration below is undone after the test
    monkeypatch.setattr(readers, "READERS", dict(READERS))
    monkeypatch.setattr(readers, "READER_OPTIONS", options)
    monkeypatch.setattr(parse_config, "READER_OPTIONS", options)
    readers.register_reader("my-recipes", options=("student_english",))(readers.read_multi_youcook2)
    items = youcook2_items(2)
    items[1]["caption_en"] = "Chop the onion, finely."
    corpus = read_corpus(dump(tmp_path / "mine.pkl", items), "my-recipes", "s3d", "train", student_english="caption_en")
    assert corpus.captions["en"][1] == ["Chop the onion, finely."] and corpus.teacher_english[1] == ["chop the onion 1"]
    assert resolve({"data.layout": "my-recipes", "data.student_english": "caption_en"})["data"]["layout"] == "my-recipes"
    with pytest.raises(ConfigError, match="is for 'data.layout' = 'multi-youcook2', 'my-recipes' \\(it is 'rudder'\\)"):
        resolve({"data.layout": "rudder", "data.student_english": "caption_en"})
