"""data_loader.translate with tiny translation models (trained to copy, so that each output depends on
its input): per-language and many-to-many, aligned captions, the cache."""
import functools
import json
import shutil
import sqlite3

import numpy as np
import pytest

from data_loader import translate
from data_loader.convert import write_safe
from data_loader.corpus import Corpus
from data_loader.readers import read_safe
from utils.tiny_encoders import build_tiny_translator

pytestmark = pytest.mark.usefixtures("one_thread")
WORDS = "a man cuts an onion in the kitchen then woman washes cup garden dog runs".split()


def english(n, seed):
    rng = np.random.default_rng(seed)
    return [[" ".join(rng.choice(WORDS, 5)) for _ in range(1 + i % 2)] for i in range(n)]


def make_split(folder, captions):
    corpus = Corpus(path=str(folder), ids=[f"v{i}" for i in range(len(captions))],
                    features=[np.ones((2, 4), np.float32)] * len(captions), captions={"en": captions})
    write_safe(corpus, folder, "2d")
    return folder


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("mt")
    texts = [" ".join(WORDS)]
    build_tiny_translator(root / "tiny-mt-en-de", texts, languages=("de",))
    shutil.copytree(root / "tiny-mt-en-de", root / "tiny-mt-en-fr")  # a second per-language model
    build_tiny_translator(root / "tiny-m2m", texts, languages=("en", "de", "fr"))
    return root


@functools.cache
def load(folder):
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer
    return AutoTokenizer.from_pretrained(folder), AutoModelForSeq2SeqLM.from_pretrained(folder)


def direct(folder, caption, lang=None):
    """The model's own translation of one caption, alone in its batch."""
    tokenizer, model = load(folder)
    extra = {} if lang is None else {"forced_bos_token_id": tokenizer.convert_tokens_to_ids(f"__{lang}__")}
    ids = model.generate(**tokenizer([caption], return_tensors="pt"), num_beams=1, max_new_tokens=6, **extra)
    return tokenizer.decode(ids[0], skip_special_tokens=True).strip()


def run(args, capsys):
    code = translate.main([*args, "--num-beams", "1", "--max-new-tokens", "6", "--batch-size", "3"])
    return code, capsys.readouterr()


def test_per_language_models_fill_aligned_captions_and_the_cache_serves_reruns_and_new_splits(tmp_path, models,
                                                                                            capsys):
    train = make_split(tmp_path / "train", english(6, 0))
    cache = tmp_path / "cache.sqlite"
    per_language = ["--model", str(models / "tiny-mt-en-{lang}"), "--cache", str(cache)]
    code, out = run([str(train), "--languages", "de", *per_language], capsys)
    unique = len({c for item in english(6, 0) for c in item})
    assert code == 0 and f"de: {unique} captions translated, 0 from the cache" in out.out, out
    corpus = read_safe(train)
    assert corpus.languages == ["en", "de"]
    assert [len(x) for x in corpus.captions["de"]] == [len(x) for x in corpus.captions["en"]]
    assert all(c.strip() for item in corpus.captions["de"] for c in item)
    meta = json.loads((train / "captions.json").read_text())
    assert meta["translations"]["de"]["model"] == str((models / "tiny-mt-en-de").resolve())
    # Each caption sits beside its own translation: distinct captions get distinct outputs, each the
    # model's translation of that caption alone.
    pairs = {e: d for es, ds in zip(corpus.captions["en"], corpus.captions["de"]) for e, d in zip(es, ds)}
    assert len(set(pairs.values())) == unique
    for en, de in pairs.items():
        assert de == direct(models / "tiny-mt-en-de", en), en

    # A new split sharing some captions and a new language: only what the cache lacks is translated.
    shared = english(6, 0)[:3]
    fresh = english(3, 1)
    evaluation = make_split(tmp_path / "eval", shared + fresh)
    code, out = run([str(train), str(evaluation), "--languages", "de", "fr", *per_language], capsys)
    new = len({c for item in fresh for c in item} - set(pairs))
    assert code == 0
    assert f"de: {new} captions translated, " in out.out, out.out
    assert "fr: " in out.out and "0 from the cache" in out.out.split("fr: ")[1]
    back = read_safe(evaluation)
    assert back.captions["de"][:3] == corpus.captions["de"][:3]
    # Unchanged inputs: nothing to do, no model loaded.
    code, out = run([str(train), str(evaluation), "--languages", "de", "fr", *per_language], capsys)
    assert code == 0 and out.out.splitlines() == [f"de: up to date ({(models / 'tiny-mt-en-de').resolve()})",
                                                  f"fr: up to date ({(models / 'tiny-mt-en-fr').resolve()})"]
    rows = sqlite3.connect(cache).execute("SELECT lang, COUNT(*) FROM translation GROUP BY lang").fetchall()
    assert dict(rows)["de"] == len({c for item in english(6, 0) + fresh for c in item})


def test_a_many_to_many_model_is_told_the_target_language_and_given_captions_are_kept(tmp_path, models, capsys):
    train = make_split(tmp_path / "train", english(4, 2))
    m2m = ["--model", str(models / "tiny-m2m"), "--cache", str(tmp_path / "cache.sqlite")]
    code, out = run([str(train), "--languages", "de", "fr", *m2m], capsys)
    assert code == 0, out.err
    meta = json.loads((train / "captions.json").read_text())
    assert {lang: meta["translations"][lang]["model"] for lang in ("de", "fr")} == \
        {"de": str((models / "tiny-m2m").resolve()), "fr": str((models / "tiny-m2m").resolve())}
    # The target language's token starts every output, so the two languages are generated apart.
    tokenizer, model = load(models / "tiny-m2m")
    inputs = tokenizer(meta["captions"]["en"][0][:1], return_tensors="pt")
    for lang in ("de", "fr"):
        token = tokenizer.convert_tokens_to_ids(f"__{lang}__")
        ids = model.generate(**inputs, num_beams=1, max_new_tokens=6, forced_bos_token_id=token)
        assert ids[0, 1] == token
        assert tokenizer.decode(ids[0], skip_special_tokens=True).strip() == meta["captions"][lang][0][0]
    # A language the model has no token for, and captions that a person gave: one line, status 2.
    code, out = run([str(train), "--languages", "sw", *m2m], capsys)
    assert code == 2 and "no language token for 'sw'" in out.err and "--lang-code sw=CODE" in out.err
    meta["captions"]["es"] = meta["captions"]["en"]
    (train / "captions.json").write_text(json.dumps(meta))
    code, out = run([str(train), "--languages", "es", *m2m, "--lang-code", "es=__fr__"], capsys)
    assert code == 2 and "already holds 'es' captions, from no recorded model" in out.err


def test_language_codes_are_part_of_the_cache_key_and_the_record(tmp_path, models, capsys):
    train = make_split(tmp_path / "train", english(4, 5))
    m2m = ["--model", str(models / "tiny-m2m"), "--cache", str(tmp_path / "cache.sqlite")]
    code, out = run([str(train), "--languages", "de", *m2m, "--lang-code", "de=fr"], capsys)  # the wrong code
    assert code == 0, out.err
    assert json.loads((train / "captions.json").read_text())["translations"]["de"]["target_code"] == "fr"
    # The right code, over the captions of the wrong one: translated again, not served from the cache.
    code, out = run([str(train), "--languages", "de", *m2m, "--overwrite"], capsys)
    unique = len({c for item in english(4, 5) for c in item})
    assert code == 0 and f"de: {unique} captions translated, 0 from the cache" in out.out, out
    meta = json.loads((train / "captions.json").read_text())
    assert meta["translations"]["de"]["target_code"] == "de"
    caption = meta["captions"]["en"][0][0]
    assert meta["captions"]["de"][0][0] == direct(models / "tiny-m2m", caption, "de")
