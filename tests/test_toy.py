"""Tests of the Multi-Toy generator and the tiny local text encoders."""
import re

import numpy as np
import pytest
import torch
from transformers import AutoModel, AutoTokenizer

from data_loader import toy
from data_loader.safe_pickle import DataFileError, load_pickle
from utils import tiny_encoders

LANGS = ("en", "de", "fr", "cs", "zh", "ru", "vi", "sw", "es")


def load(path):
    """Through the project's restricted unpickler: the toy files hold only what released files hold."""
    return load_pickle(path)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    out = tmp_path_factory.mktemp("toy")
    paths = toy.generate(out, seed=0, n_train=300, n_test=60)
    return load(paths["train"]), load(paths["test"]), paths


def test_languages_and_lexicon_are_consistent():
    assert toy.languages() == LANGS
    assert set(toy.ERROR_RATES) == set(LANGS) and toy.ERROR_RATES["en"] == 0.0
    for lang, lex in toy.LEXICON.items():
        assert len(lex["templates"]) == toy.N_TEMPLATES
        for kind in toy.KINDS:
            assert len(lex[kind]) == len(toy.CONCEPTS[kind])
            # Each surface form is recognised as exactly its own concept, so
            # captions can be checked against the events they describe.
            for i, word in enumerate(lex[kind]):
                assert toy.mentions(word, lang) == {(kind, i): 1}, (lang, word)
        for fmt in lex["templates"] + [lex["clause"], lex["then"]]:
            assert not toy.mentions(fmt.format(a="", o="", p=""), lang), (lang, fmt)
    assert "Zwiebel" in toy.render("de", 0, [(0, 0, 0)])


def test_generation_is_deterministic(tmp_path):
    kw = dict(n_train=20, n_test=10, n_val=10, n_english=30)
    a = toy.generate(tmp_path / "a", seed=3, **kw)
    b = toy.generate(tmp_path / "b", seed=3, **kw)
    c = toy.generate(tmp_path / "c", seed=4, **kw)
    assert set(a) == {"train", "val", "test", "english"}
    for split in a:
        assert a[split].read_bytes() == b[split].read_bytes()
        assert a[split].read_bytes() != c[split].read_bytes()


def test_validation_and_english_rich_splits_leave_the_others_as_they_were(tmp_path):
    plain = toy.generate(tmp_path / "plain", seed=0, n_train=20, n_test=10, n_val=0)
    full = toy.generate(tmp_path / "full", seed=0, n_train=20, n_test=10, n_val=12, n_english=50)
    for split in ("train", "test"):
        assert plain[split].read_bytes() == full[split].read_bytes()
    train, val, test, english = (load(full[split]) for split in ("train", "val", "test", "english"))
    assert len(val) == 12 and set(val[0]) == set(test[0])
    assert len({item["eval_caption_en"] for item in val}) == len(val)  # each caption names one video
    # The English-rich file: the training items as they are, then videos captioned in English only.
    assert len(english) == 50
    assert [item["id"] for item in english[:20]] == [item["id"] for item in train]
    assert all(item["caption_de"] == t["caption_de"] for item, t in zip(english, train))
    for item in english[20:]:
        assert set(item) == {"id", "2d", "events", "caption_en"} and len(item["caption_en"]) == 5
        check_features(item)
        check_events(item)
    ids = [item["id"] for item in english + val + test]
    assert len(set(ids)) == len(ids)


def test_generation_reuses_matching_files(tmp_path):
    paths = toy.generate(tmp_path, seed=0, n_train=10, n_test=5)
    stamp = paths["train"].stat().st_mtime_ns
    assert toy.generate(tmp_path, seed=0, n_train=10, n_test=5) == paths
    assert paths["train"].stat().st_mtime_ns == stamp
    toy.generate(tmp_path, seed=0, n_train=12, n_test=5)
    assert len(load(paths["train"])) == 12
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "manifest.json", "multi_toy_test.pkl", "multi_toy_train.pkl", "multi_toy_val.pkl"]
    # A new parameter (here the English-rich file) regenerates; the same one again reuses.
    paths = toy.generate(tmp_path, seed=0, n_train=12, n_test=5, n_english=15)
    stamp = paths["english"].stat().st_mtime_ns
    assert toy.generate(tmp_path, seed=0, n_train=12, n_test=5, n_english=15) == paths
    assert paths["english"].stat().st_mtime_ns == stamp and len(load(paths["english"])) == 15


def check_events(item):
    T = item["2d"].shape[0]
    end = 0
    for ev in item["events"]:
        assert set(ev) == {"start", "end", "action", "object", "place", "caption_en"}
        assert type(ev["start"]) is int and type(ev["end"]) is int
        assert end <= ev["start"] < ev["end"] <= T  # ordered, disjoint, inside [0, T)
        end = ev["end"]
        assert ev["action"] in toy.CONCEPTS["action"] and ev["place"] in toy.CONCEPTS["place"]
        assert ev["object"] in toy.CONCEPTS["object"]
    assert 1 <= len(item["events"]) <= 3


def check_features(item):
    feats = item["2d"]
    assert isinstance(feats, np.ndarray) and feats.dtype == np.float32
    assert feats.ndim == 2 and feats.shape[1] == 512 and 8 <= feats.shape[0] <= 24
    assert np.isfinite(feats).all()


def test_train_layout(small):
    train, _, _ = small
    assert isinstance(train, list) and len(train) == 300
    for item in train:
        assert set(item) == {"id", "2d", "events"} | {f"caption_{lang}" for lang in LANGS}
        assert re.fullmatch(r"toy\d{5}", item["id"])
        check_features(item)
        check_events(item)
        for lang in LANGS:
            caps = item[f"caption_{lang}"]
            assert isinstance(caps, list) and len(caps) == 5
            assert all(isinstance(c, str) and c for c in caps)
            # Aligned by index: a caption joins two events in every language or in none.
            then = toy.LEXICON[lang]["then"].strip(" ,，")
            assert [then in c for c in caps] == [", then " in c for c in item["caption_en"]]
        assert len(set(item["caption_en"])) == 5  # different events or phrasings


def test_test_layout_and_captions_identify_videos(small):
    train, test, _ = small
    assert len(test) == 60
    for item in test:
        assert set(item) == {"id", "2d", "events"} | {f"eval_caption_{lang}" for lang in LANGS}
        check_features(item)
        check_events(item)
        assert all(isinstance(item[f"eval_caption_{lang}"], str) for lang in LANGS)
    assert len({item["eval_caption_en"] for item in test}) == len(test)
    ids = [item["id"] for item in train + test]
    assert len(set(ids)) == len(ids)


def test_a_test_video_without_new_events_is_an_error():
    class EverythingSeen(set):
        def __contains__(self, described):
            return True

    vecs = toy._concept_vectors(0, 16)
    with pytest.raises(DataFileError, match="test video v: no new events in 100 draws"):
        toy._test_item("v", np.random.default_rng(0), vecs, 16, EverythingSeen())


def test_translation_error_rates(small):
    train, test, _ = small
    pairs = [(c_en, c, lang) for item in train for lang in LANGS
             for c_en, c in zip(item["caption_en"], item[f"caption_{lang}"])]
    pairs += [(item["eval_caption_en"], item[f"eval_caption_{lang}"], lang)
              for item in test for lang in LANGS]
    measured = {}
    for lang in LANGS:
        total = kept = 0
        for c_en, c, l in pairs:
            if l != lang:
                continue
            ref, got = toy.mentions(c_en, "en"), toy.mentions(c, lang)
            total += sum(ref.values())
            kept += sum(min(n, got[k]) for k, n in ref.items())
        measured[lang] = 1 - kept / total
    assert measured["en"] == 0.0
    for lang in LANGS[1:]:
        rate = toy.ERROR_RATES[lang]
        assert abs(measured[lang] - rate) < max(0.03, 0.25 * rate), (lang, measured[lang])
    assert measured["sw"] > measured["de"]


def test_non_ascii_scripts(small):
    train, _, _ = small
    text = {lang: " ".join(c for item in train for c in item[f"caption_{lang}"]) for lang in LANGS}
    assert re.search(r"[\u4e00-\u9fff]", text["zh"])
    assert re.search(r"[\u0400-\u04ff]", text["ru"])
    assert re.search(r"[ěščřžýůú]", text["cs"])
    assert re.search(r"[ạảấầẩậắằẳặẹẻẽếềểệỉịọỏốồổộớờởợụủứừửựỳỷỹđ]", text["vi"])
    assert text["en"].isascii()


@pytest.fixture(scope="module")
def encoders(small, tmp_path_factory):
    corpus = tiny_encoders.train_captions(small[2]["train"])
    return tiny_encoders.build(tmp_path_factory.mktemp("enc"), corpus, seed=0), corpus


MODEL_CLASS = {"labse-tiny": "BertModel", "mbert-tiny": "BertModel",
               "xlmr-tiny": "XLMRobertaModel", "distiluse-tiny": "DistilBertModel"}


@pytest.mark.parametrize("name", list(MODEL_CLASS))
def test_encoder_loads_like_a_hub_checkpoint(encoders, small, name):
    folder = encoders[0][name]
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModel.from_pretrained(folder).eval()
    assert type(model).__name__ == MODEL_CLASS[name]
    assert model.config.hidden_size == 64 and tok.model_max_length == 64

    _, test, _ = small
    texts = [test[0]["eval_caption_zh"], test[0]["eval_caption_ru"], test[0]["eval_caption_en"]]
    batch = tok(texts, padding="max_length", truncation=True, max_length=40, return_tensors="pt")
    expected = {"input_ids", "attention_mask"}
    if MODEL_CLASS[name] == "BertModel":  # only BERT takes segment ids
        expected.add("token_type_ids")
    assert set(batch) == expected and batch["input_ids"].shape == (3, 40)
    for ids, mask in zip(batch["input_ids"], batch["attention_mask"]):
        real = [i for i, m in zip(ids.tolist(), mask.tolist()) if m]
        content = [i for i in real if i not in tok.all_special_ids]
        assert content and any(i != tok.unk_token_id for i in content)
    with torch.no_grad():
        out = model(**batch).last_hidden_state
    assert out.shape == (3, 40, 64) and torch.isfinite(out).all()
    # The longest input the position embeddings allow also runs.
    long = tok(["x " * 200], padding="max_length", truncation=True, max_length=64,
               return_tensors="pt")
    with torch.no_grad():
        out = model(**long).last_hidden_state
    assert out.shape == (1, 64, 64) and torch.isfinite(out).all()


def test_mbert_is_uncased_and_labse_is_cased(encoders):
    folders = encoders[0]
    mbert = AutoTokenizer.from_pretrained(folders["mbert-tiny"])
    labse = AutoTokenizer.from_pretrained(folders["labse-tiny"])
    assert mbert("Eine PERSON in der KÜCHE")["input_ids"] == mbert("eine person in der kuche")["input_ids"]
    assert labse("Eine Person")["input_ids"] != labse("eine person")["input_ids"]


def test_encoders_are_reused_and_seeded(encoders, tmp_path):
    folders, corpus = encoders
    stamp = (folders["labse-tiny"] / "model.safetensors").stat().st_mtime_ns
    again = tiny_encoders.build(folders["labse-tiny"].parent, corpus, seed=0, names=["labse-tiny"])
    assert (again["labse-tiny"] / "model.safetensors").stat().st_mtime_ns == stamp
    other = tiny_encoders.build(tmp_path, corpus, seed=1, names=["labse-tiny"])
    w0 = AutoModel.from_pretrained(folders["labse-tiny"]).embeddings.word_embeddings.weight
    w1 = AutoModel.from_pretrained(other["labse-tiny"]).embeddings.word_embeddings.weight
    assert w0.shape == w1.shape and not torch.equal(w0, w1)
    # Different encoders get different initialisations too.
    w2 = AutoModel.from_pretrained(folders["distiluse-tiny"]).embeddings.word_embeddings.weight
    assert not torch.equal(w0[:10], w2[:10])


def test_ensure_toy_assets_layout(tmp_path):
    assets = tiny_encoders.ensure_toy_assets(tmp_path, n_english=1500)  # the default writes 300 MB
    assert assets["train"] == tmp_path / "multi_toy" / "multi_toy_train.pkl"
    assert assets["test"] == tmp_path / "multi_toy" / "multi_toy_test.pkl"
    assert assets["val"] == tmp_path / "multi_toy" / "multi_toy_val.pkl"
    assert assets["english"] == tmp_path / "multi_toy" / "multi_toy_train_english.pkl"
    assert set(assets["encoders"]) == set(MODEL_CLASS)
    for name, folder in assets["encoders"].items():
        assert folder == tmp_path / "encoders" / name
        assert (folder / "config.json").exists() and (folder / "tokenizer.json").exists()
    assert len(load(assets["train"])) == 1000 and len(load(assets["test"])) == 200
    assert len(load(assets["val"])) == 200 and len(load(assets["english"])) == 1500


def test_tiny_encoders_are_rebuilt_identically(tmp_path):
    from utils import tiny_encoders
    texts = ["A man cuts an onion.", "Ein Mann schneidet eine Zwiebel.", "一个男人切洋葱。", "Мужчина режет лук."] * 3
    first = tiny_encoders.build(tmp_path / "a", texts)
    second = tiny_encoders.build(tmp_path / "b", texts)
    for name in first:
        assert (first[name] / "tokenizer.json").read_bytes() == (second[name] / "tokenizer.json").read_bytes(), name
        assert (first[name] / "model.safetensors").read_bytes() == (second[name] / "model.safetensors").read_bytes()
    # One encoder built alone has the weights it has in a full build (its folder is reused for either).
    alone = tiny_encoders.build(tmp_path / "c", texts, names=["xlmr-tiny"])
    assert (alone["xlmr-tiny"] / "model.safetensors").read_bytes() == (first["xlmr-tiny"] / "model.safetensors").read_bytes()
