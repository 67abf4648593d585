"""data_loader.translate with tiny random translation models; the recipe from raw videos to the table."""
import json
import os
import sqlite3
import subprocess
from pathlib import Path

import numpy as np
import pytest

from data_loader import translate
from data_loader.convert import write_safe
from data_loader.corpus import Corpus, read_safe
from data_loader.video import synthetic_frames, write_video
from utils.tiny_encoders import build_tiny_clip, build_tiny_translator

ROOT = Path(__file__).resolve().parents[1]
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
    for i, lang in enumerate(("de", "fr")):
        build_tiny_translator(root / f"tiny-mt-en-{lang}", texts, seed=i)
    build_tiny_translator(root / "tiny-m2m", texts, family="m2m100", languages=("en", "de", "fr"))
    return root


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
    # The same English text gets the same translation wherever it occurs (one cache entry).
    pairs = {e: d for es, ds in zip(corpus.captions["en"], corpus.captions["de"]) for e, d in zip(es, ds)}
    assert len(pairs) == unique

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
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(models / "tiny-m2m")
    model = AutoModelForSeq2SeqLM.from_pretrained(models / "tiny-m2m")
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


def test_recipe_from_videos_to_the_table(tmp_path, toy_assets):
    """scripts/from_videos/run.sh end to end with tiny models: extract (one video is corrupt), translate,
    check, a translate-train teacher, a C2KD student and the per-language table."""
    videos = tmp_path / "videos"
    videos.mkdir()
    for i in range(10):
        write_video(videos / f"clip{i}.mp4", synthetic_frames(8 + i, 32, 40, seed=i), 8)
    (videos / "clip10.mp4").write_bytes(b"not a video")
    captions = {"train": {f"clip{i}": c for i, c in zip(range(6), english(6, 3))},
                "eval": {f"clip{i}": c for i, c in zip(range(6, 11), english(5, 4))}}
    (tmp_path / "captions.json").write_text(json.dumps(captions))
    build_tiny_clip(tmp_path / "tiny-clip", image_size=32)
    for lang in ("de", "sw"):
        build_tiny_translator(tmp_path / f"tiny-mt-en-{lang}", [" ".join(WORDS)])
    env = {**os.environ, "ENCODER_MODEL": str(tmp_path / "tiny-clip"), "MT_MODEL": str(tmp_path / "tiny-mt-en-{lang}"),
           "LANGUAGES": "de sw", "TEACHER": str(toy_assets["encoders"]["xlmr-tiny"]),
           "STUDENT": str(toy_assets["encoders"]["labse-tiny"]), "EXTRACT_ARGS": "--fps 4 --size 32 --workers 1",
           "TRANSLATE_ARGS": "--num-beams 1 --max-new-tokens 6"}
    out = tmp_path / "out"
    small = ["-d", "cpu", "--set", "trainer.epochs=1", "--set", "trainer.max_steps_per_epoch=2", "--set",
             "data.batch_size=3", "--set", "model.width=32", "--set", "model.depth=1", "--set", "model.heads=2"]
    result = subprocess.run(["bash", "scripts/from_videos/run.sh", str(videos), str(tmp_path / "captions.json"),
                             str(out), *small], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "== some videos failed" in result.stdout
    assert (out / "data" / "failed.tsv").read_text().startswith("clip10\tcannot decode")
    evaluation = read_safe(out / "data" / "eval")
    assert evaluation.ids == ["clip6", "clip7", "clip8", "clip9"] and evaluation.languages == ["en", "de", "sw"]
    assert evaluation.feature_dim == 16  # the tiny CLIP's projection
    for run in ("teacher", "c2kd"):
        record = json.loads((out / "runs" / run / "seed0" / "run.json").read_text())
        assert record["status"] == "COMPLETED" and "t2v" in json.dumps(record["result"])
    config = json.loads((out / "runs" / "c2kd" / "seed0" / "config.json").read_text())
    assert config["stage"] == "c2kd" and config["data"]["layout"] == "safe"
    table = (out / "report" / "table.csv").read_text()
    assert "Translate-train teacher" in table and "C2KD" in table
    header = (out / "report" / "table.md").read_text()
    assert "| en | de | sw |" in header
