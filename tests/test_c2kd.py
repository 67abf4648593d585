"""C2KD end to end: teachers trained here, cached teacher outputs, parity with online teachers, bad input."""
import json
from pathlib import Path

import pytest
import torch

import train as train_entry
from parse_config import flatten_config, resolve
from tests.conftest import make_trainer, sacred_scalars, toy_config, write_json_config
from common.checkpoint import load_checkpoint, save_checkpoint


@pytest.fixture(scope="module")
def setup(tmp_path_factory, toy_assets):
    tmp = tmp_path_factory.mktemp("c2kd")
    teachers = []
    for encoder in ("xlmr-tiny", "distiluse-tiny"):
        name = f"teacher_{encoder.split('-')[0]}"
        path = write_json_config(tmp, name, toy_config(toy_assets, tmp, **{
            "trainer.epochs": 1, "model.text_encoder": str(toy_assets["encoders"][encoder])}))
        assert train_entry.main(["-c", str(path), "--run-id", "seed0", "-d", "cpu"]) == 0
        teachers.append(str(tmp / "runs" / name / "seed0" / "latest.pt"))
    student = toy_config(toy_assets, tmp, "c2kd", teachers, **{
        "trainer.epochs": 1, "loss.balance": 0.5, "loss.distill_temp": 0.1, "loss.teacher_pool": "max"})
    return {"tmp": tmp, "teachers": teachers, "student": student, "assets": toy_assets}


def test_c2kd_trains_and_reuses_cached_teacher_outputs(setup, capsys):
    tmp = setup["tmp"]
    path = write_json_config(tmp, "student", setup["student"])
    assert train_entry.main(["-c", str(path), "--run-id", "a", "-d", "cpu"]) == 0
    cache_files = sorted((tmp / "teacher_cache").glob("*.pt"))
    assert len(cache_files) == 2
    stamps = [f.stat().st_mtime_ns for f in cache_files]
    assert capsys.readouterr().out.count("teacher outputs: wrote") == 2
    assert train_entry.main(["-c", str(path), "--run-id", "b", "-d", "cpu"]) == 0
    assert capsys.readouterr().out.count("teacher outputs: reusing") == 2
    assert [f.stat().st_mtime_ns for f in cache_files] == stamps
    run = tmp / "runs" / "student" / "a"
    saved = json.loads((run / "config.json").read_text())
    assert saved["stage"] == "c2kd" and saved["teachers"]["checkpoints"] == setup["teachers"]
    assert saved["loss"]["teacher_pool"] == "max"
    assert len(sacred_scalars(run, "val.t2v_mean_R1")) == 1


def flagged_teachers(setup, student_mask=False, clean_english=False):
    """Copies of the teachers flagged to pool with the student's mask and to read cleaned English, as
    converted reference teachers of MSR-VTT, VATEX and YouCook2 are."""
    paths = []
    for i, path in enumerate(setup["teachers"]):
        state = load_checkpoint(path)
        state["config"]["model"]["pool_with_student_mask"] = student_mask
        state["config"]["model"]["role"] = "teacher"
        state["config"]["data"]["clean_english"] = clean_english
        name = f"teacher{i}_mask{int(student_mask)}_clean{int(clean_english)}.pt"
        paths.append(str(save_checkpoint(state, setup["tmp"] / name)))
    return paths


def cached_and_online(setup, pool, student_mask, clean_english=False, student_cleans=False):
    """The loss and teacher targets of one batch with cached and with online teachers."""
    losses = {}
    paths = flagged_teachers(setup, student_mask, clean_english)
    for mode in ("cached", "online"):
        config = resolve({**flatten_config(setup["student"]), "teachers.mode": mode, "loss.teacher_pool": pool,
                          "teachers.checkpoints": paths, "data.clean_english": student_cleans})
        trainer, batch = make_trainer(config)
        model = trainer.model.eval()  # no dropout, so both modes see identical student outputs
        with torch.no_grad():
            video = model.encode_video(batch.video, batch.video_mask)
            text = {lang: model.encode_text(tokens) for lang, tokens in batch.student.items()}
            sims = trainer.teachers.similarities(batch)
            losses[mode] = (trainer.loss_fn(text, video, teacher_sims=sims)[0].item(), sims)
    return losses


@pytest.mark.parametrize("pool, student_mask, clean_english, student_cleans", [
    ("max", False, False, False), ("multitask", False, False, False), ("learnable", False, False, False),
    ("mean", True, True, False),
    ("max", True, False, True)])  # the student mask is of the raw caption, whatever the student reads
def test_cached_and_online_teachers_give_the_same_loss(setup, pool, student_mask, clean_english, student_cleans):
    losses = cached_and_online(setup, pool, student_mask, clean_english, student_cleans)
    assert losses["cached"][0] == pytest.approx(losses["online"][0], abs=1e-5)
    for cached, online in zip(losses["cached"][1], losses["online"][1]):
        assert torch.allclose(cached, online, atol=1e-5)


def test_teacher_targets_are_float32_products_under_autocast(setup):
    from model.loss import cosine_sim
    from trainer.teachers import CachedTeachers, OnlineTeachers
    for mode, kind in (("cached", CachedTeachers), ("online", OnlineTeachers)):
        config = resolve({**flatten_config(setup["student"]), "teachers.mode": mode})
        trainer, batch = make_trainer(config)
        teachers = trainer.teachers
        assert type(teachers) is kind and len(teachers) == len(setup["teachers"])
        with torch.no_grad():
            plain = teachers.similarities(batch)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                rounded = teachers.similarities(batch)
                if mode == "online":  # the encoders do run under autocast; only the products are fp32
                    model = teachers.teachers[0].model
                    text = model.encode_text(batch.text[teachers.input_name(0)]["en"])
                    video = model.encode_video(batch.video, batch.video_mask)
        assert all(s.dtype == torch.float32 for s in rounded)
        if mode == "cached":
            assert all(torch.equal(a, b) for a, b in zip(plain, rounded))
        else:
            assert text.dtype == torch.bfloat16
            assert torch.equal(rounded[0], cosine_sim(text.float(), video.float()))


def test_teachers_read_english_as_they_were_trained(setup):
    from data_loader.dataset import clean_caption
    tokens = {}
    for clean in (False, True):
        config = resolve({**flatten_config(setup["student"]), "teachers.mode": "online",
                          "teachers.checkpoints": flagged_teachers(setup, clean_english=clean)})
        trainer, batch = make_trainer(config)
        teacher = trainer.teachers.teachers[0]
        assert teacher.english.clean is clean
        caption = trainer.train_loader.dataset.corpus.captions["en"][int(batch.index[0])][int(batch.caption_index[0])]
        text = clean_caption(caption) if clean else caption
        expected = teacher.tokenizer(text, padding="max_length", truncation=True,
                                     max_length=config["data"]["max_words_train"])["input_ids"]
        tokens[clean] = batch.text[trainer.teachers.input_name(0)]["en"].input_ids[0].tolist()
        assert tokens[clean] == expected
    assert tokens[False] != tokens[True]  # Multi-Toy captions carry punctuation


def test_student_mask_pooling_changes_the_teacher_targets(setup):
    own = cached_and_online(setup, "mean", False)["cached"][1]
    student = cached_and_online(setup, "mean", True)["cached"][1]
    # The teachers' tokenizers split captions differently from the student's, so the masks differ.
    assert not torch.allclose(own[0], student[0], atol=1e-4)


def bad_run(setup, capsys, **overrides):
    config = json.loads(json.dumps(setup["student"]))
    for section, values in overrides.items():
        if isinstance(values, dict):
            config.setdefault(section, {}).update(values)
        else:
            config[section] = values
    path = write_json_config(setup["tmp"], "bad_student", config)
    code = train_entry.main(["-c", str(path), "-d", "cpu"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and err.startswith("error: ")
    assert not list((setup["tmp"] / "runs" / "bad_student").glob("*/latest.pt"))  # nothing trained
    return err


def test_c2kd_without_teachers_is_refused(setup, capsys):
    err = bad_run(setup, capsys, teachers={"checkpoints": []})
    assert "set config key 'teachers.checkpoints'" in err


def test_missing_and_unreadable_teacher_checkpoints_are_refused(setup, capsys):
    missing = str(setup["tmp"] / "nowhere.pt")
    assert f"{missing}: checkpoint not found" in bad_run(setup, capsys, teachers={"checkpoints": [missing]})
    junk = setup["tmp"] / "junk.pt"
    junk.write_bytes(b"not a checkpoint at all")
    assert f"{junk}: not a readable checkpoint" in bad_run(setup, capsys, teachers={"checkpoints": [str(junk)]})


def test_teacher_for_other_features_and_without_tokenizer_are_refused(setup, capsys):
    state = load_checkpoint(setup["teachers"][0])
    state["config"]["data"]["feature_dim"] = 1024
    other = save_checkpoint(state, setup["tmp"] / "s3d_teacher.pt")
    err = bad_run(setup, capsys, teachers={"checkpoints": [str(other)]})
    assert "teacher was trained on 1024-d video features, but config key 'data.feature_dim' is 512" in err
    state = load_checkpoint(setup["teachers"][0])
    state["config"]["model"]["text_encoder"] = str(setup["tmp"] / "deleted-encoder")
    lost = save_checkpoint(state, setup["tmp"] / "lost_tokenizer.pt")
    err = bad_run(setup, capsys, teachers={"checkpoints": [str(lost)]})
    assert "deleted-encoder': no such folder" in err


def test_unknown_pooling_is_refused(setup, capsys):
    err = bad_run(setup, capsys, loss={"teacher_pool": "median"})
    assert "config key 'loss.teacher_pool' = \"median\" is not one of" in err


def test_cached_teachers_score_each_items_caption_of_the_batch():
    """Cached rows: video v's captions start at offsets[v]; an item is scored with its caption_index-th
    caption (its last one if it has fewer); an item without a caption gets a row it is masked out of."""
    from types import SimpleNamespace
    from trainer.teachers import CachedTeachers
    gen = torch.Generator().manual_seed(0)
    text = torch.nn.functional.normalize(torch.randn(4, 8, generator=gen), dim=1)
    video = torch.nn.functional.normalize(torch.randn(3, 8, generator=gen), dim=1)
    counts = torch.tensor([2, 0, 2])
    teachers = CachedTeachers([{"text": text, "video": video, "offsets": torch.cumsum(counts, 0) - counts,
                                "counts": counts}])
    assert len(teachers) == 1 and teachers.text_inputs == ()
    batch = SimpleNamespace(index=torch.tensor([2, 0, 0, 1]), caption_index=torch.tensor([1, 0, 5, 0]))
    [sims] = teachers.similarities(batch)  # cached teachers read only the batch's item and caption indices
    rows = [3, 0, 1, 2]  # item 2's second caption, item 0's first, item 0's last, item 1's own offset
    assert sims.dtype == torch.float32
    torch.testing.assert_close(sims, text[rows] @ video[[2, 0, 0, 1]].t())


def test_teacher_cache_key_follows_what_the_teachers_embed(setup):
    import copy
    from types import SimpleNamespace
    from trainer.build import load_corpora
    from data_loader.dataset import EnglishReading
    from trainer.teachers import TeacherCache

    corpus = load_corpora(toy_config(setup["assets"], setup["tmp"], "c2kd", setup["teachers"]))["train"]

    def key(clean_english=False, data=corpus, **flat):
        teacher = SimpleNamespace(path=Path(setup["teachers"][0]), pool_with_student_mask=False,
                                  english=EnglishReading(teacher=True, clean=clean_english))
        config = toy_config(setup["assets"], setup["tmp"], "c2kd", setup["teachers"], **flat)
        return TeacherCache(data, config, student_tokenizer=None).key(teacher)

    base = key()
    assert key(clean_english=True) != base
    assert key(**{"loss.balance": 0.9, "optimizer.lr": 1.0}) == base  # the student's settings do not matter
    for changed in ({"data.n_video_tokens": 12}, {"data.max_words_train": 16}):
        assert key(**changed) != base, changed
    # The data itself, not its file's name and time: frames rewritten in place, an English caption
    # changed (a caption fallback or another layout would do it) give another key; another
    # language's captions do not matter to English-input teachers.
    frames = copy.deepcopy(corpus)
    frames.features[3] = frames.features[3] + 1e-3
    english = copy.deepcopy(corpus)
    english.captions["en"][5] = english.captions["en"][5] + ["another caption"]
    german = copy.deepcopy(corpus)
    german.captions["de"][5] = ["eine andere Beschreibung"]
    assert key(data=frames) != base and key(data=english) != base
    assert key(data=german) == base


def test_every_stage_starts_from_the_same_student_at_one_seed(setup, monkeypatch):
    """Loading teachers draws random numbers (their modules are built before their weights are read):
    the student is built first, so C2KD and translate-train start from the same weights."""
    from trainer.trainer import Trainer
    initial = {}

    def record_initial_weights(trainer):
        initial[trainer.settings.config["stage"]] = {k: v.clone() for k, v in trainer.model.state_dict().items()}

    monkeypatch.setattr(Trainer, "fit", record_initial_weights)
    baseline = toy_config(setup["assets"], setup["tmp"], "translate-train", **{"trainer.epochs": 1})
    for name, config in (("init_c2kd", setup["student"]), ("init_tt", baseline)):
        assert train_entry.main(["-c", str(write_json_config(setup["tmp"], name, config)), "-d", "cpu"]) == 0
    c2kd, translate_train = initial["c2kd"], initial["translate-train"]
    assert c2kd.keys() == translate_train.keys()
    assert all(torch.equal(c2kd[k], translate_train[k]) for k in c2kd)


@pytest.mark.parametrize("saved_clean, expected", [(True, (True, True)), (None, (False, False))])
def test_a_checkpoint_saved_before_model_role_reads_english_alike_in_every_loader(setup, saved_clean, expected):
    """A teacher saved before model.role existed, with data.clean_english true (it trained on cleaned
    English) or without it (it trained on English as written), reads English the same way when it is
    distilled from, searched with, evaluated by test.py and resumed by train.py; saved before
    model.length_bucket_rows existed, it runs its text as one bucket in each of them."""
    from data_loader.dataset import EnglishReading
    from parse_config import build_parser, config_from_args
    from trainer.teachers import load_teacher
    from utils.inference import Retriever

    state = load_checkpoint(setup["teachers"][0])
    del state["config"]["model"]["role"], state["config"]["model"]["length_bucket_rows"]
    if saved_clean is None:
        del state["config"]["data"]["clean_english"]
    else:
        state["config"]["data"]["clean_english"] = saved_clean
    path = save_checkpoint(state, setup["tmp"] / f"old_style_clean{saved_clean}.pt")
    teacher = load_teacher(path, state["config"]["data"]["feature_dim"], "cpu")
    retriever = Retriever.from_checkpoint(path)
    readings = {"distilled": teacher.english, "searched": EnglishReading.of(retriever.config)}
    bucket_rows = {"distilled": teacher.model.text.bucket_rows, "searched": retriever.model.text.bucket_rows}
    for command, train in (("test.py -r", False), ("train.py -r", True)):
        args = build_parser(command, train).parse_args(["-r", str(path)])
        config = config_from_args(args, flatten_config(state["config"]), path)
        readings[command] = EnglishReading.of(config)
        bucket_rows[command] = config["model"]["length_bucket_rows"]
    assert {name: (r.teacher, r.clean) for name, r in readings.items()} == dict.fromkeys(readings, expected)
    assert bucket_rows == dict.fromkeys(readings, None)


def test_querybank_english_is_read_as_the_model_reads_english(setup):
    """QB-Norm's querybank captions are tokenized as the model's own captions: regex-cleaned English
    for a teacher of a dataset whose teachers read it so, as written for a student of that dataset."""
    from model.model import model_from_checkpoint
    from trainer.evaluate import embed_querybanks
    state = load_checkpoint(setup["teachers"][0])
    model, tokenizer = model_from_checkpoint(state["config"], state, setup["teachers"][0])
    typed, plain = "a dog, (running) on grass!", "a dog running on grass"
    banks = {}
    for role in ("student", "teacher"):
        config = resolve({**flatten_config(state["config"]), "model.role": role, "data.clean_english": True})
        bank = embed_querybanks(model, tokenizer, {"en": [("en", typed), ("en", plain)]}, config)["en"]
        banks[role] = torch.equal(bank[0], bank[1])
    assert banks == {"student": False, "teacher": True}
