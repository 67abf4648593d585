"""Every shipped config resolves, and the dataset configs and scripts follow the paper's matrix
(docs/reference.md §7: epochs, learning rate, temperatures, λ, τd, teacher pooling, token lengths)."""
import re
import subprocess
from pathlib import Path

import pytest

from config_keys import KEYS
from parse_config import load_flat, resolve

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").rglob("*.json"))
STAGE_CONFIGS = ("zero_shot", "translate_train", "c2kd", "teacher_xlmr", "teacher_mbert", "teacher_distill")
TEACHER_ENCODERS = {"xlmr": "xlm-roberta-base", "mbert": "bert-base-multilingual-uncased",
                    "distill": "sentence-transformers/distiluse-base-multilingual-cased-v2"}
STUDENT = "sentence-transformers/LaBSE"

# dataset -> features -> (feature key, dim, train file, eval file)
FEATURES = {
    "msrvtt": {"clip": ("2d", 512, "data/msrvtt/clip/msrvtt_train_multilingual.pkl",
                        "data/msrvtt/clip/msrvtt_jsfusion_test_multilingual.pkl"),
               "s3d": ("s3d", 1024, "data/msrvtt/s3d/msrvtt_train_multilingual.pkl",
                       "data/msrvtt/s3d/msrvtt_jsfusion_test_multilingual.pkl")},
    "vatex": {"clip": ("2d", 512, "data/vatex/clip/vatex_train_multilingual.pkl",
                       "data/vatex/clip/vatex_test_multilingual.pkl")},
    "youcook2": {"s3d": ("s3d", 1024, "data/youcook2/s3d/youcook_train_audio_multilingual.pkl",
                         "data/youcook2/s3d/youcook_val_audio_multilingual_fixed.pkl"),
                 "clip": ("2d_raw", 512, "data/youcook2/clip/youcook_train_audio_multilingual.pkl",
                          "data/youcook2/clip/youcook_val_audio_multilingual.pkl")},
    "rudder": {"clip": ("2d", 512, "data/rudder/clip/rudder_train.pkl", "data/rudder/clip/rudder_test.pkl")},
}
DEFAULT_FEATURE = {"msrvtt": "clip", "vatex": "clip", "youcook2": "s3d", "rudder": "clip"}
LAYOUT = {"msrvtt": "multi-msrvtt", "vatex": "multi-msrvtt", "youcook2": "multi-youcook2", "rudder": "rudder"}
LANGUAGES = {"msrvtt": ["en", "de", "fr", "cs", "zh", "ru", "vi", "sw", "es"], "vatex": ["en", "zh"],
             "youcook2": ["en", "de", "fr", "cs", "zh", "ru", "vi", "es", "ja"], "rudder": ["en", "hi", "mr", "kn"]}
TOTAL_QUERIES = {"msrvtt": 1000, "vatex": None, "youcook2": 3350, "rudder": None}
# dataset -> (epochs, lr); c2kd: (λ, τd, pool as really computed); the reference's names in comments
RECIPE = {"msrvtt": (20, 1e-4), "vatex": (30, 1e-4), "youcook2": (10, 1e-4), "rudder": (20, 5e-5)}
C2KD = {"msrvtt": (0.5, 0.1, "max"),      # --teacher_sim_pool min
        "youcook2": (0.1, 0.1, "max"),    # --teacher_sim_pool min
        "vatex": (0.1, 0.1, "min"),       # --teacher_sim_pool max
        "rudder": (0.1, 0.1, "mean")}
TEACHER_LR = {("rudder", "distill"): 1e-4}
# (dataset, feature) -> temperature for {baselines, teachers, c2kd}; training tokens {baselines/c2kd, teachers}
TEMPERATURE = {("msrvtt", "clip"): (0.1, 0.05, 0.1), ("msrvtt", "s3d"): (0.1, 0.05, 0.1),
               ("vatex", "clip"): (0.05, 0.05, 0.05), ("youcook2", "s3d"): (0.1, 0.05, 0.05),
               ("youcook2", "clip"): (0.1, 0.1, 0.1), ("rudder", "clip"): (0.05, 0.05, 0.05)}
MAX_WORDS = {"msrvtt": (35, 40), "vatex": (40, 40), "youcook2": (35, 35), "rudder": (40, 40)}
# dataset -> whether its teachers read regex-cleaned English (docs/reference.md §1.3: RUDDER's read the raw caption)
TEACHERS_CLEAN_ENGLISH = {"msrvtt": True, "vatex": True, "youcook2": True, "rudder": False}


def config(path):
    path = Path(path)
    return resolve(load_flat(path), name=path.stem)


@pytest.mark.parametrize("path", CONFIGS, ids=[str(p.relative_to(ROOT / "configs")) for p in CONFIGS])
def test_every_config_resolves(path):
    cfg = config(path)
    assert cfg["name"] == path.stem


MATRIX = [(ds, feat, stage) for ds, feats in FEATURES.items() for feat in feats for stage in STAGE_CONFIGS]


@pytest.mark.parametrize("ds, feat, stage", MATRIX, ids=[f"{d}/{f}/{s}" for d, f, s in MATRIX])
def test_matrix_hyper_parameters(ds, feat, stage):
    cfg = config(ROOT / "configs" / ds / feat / f"{stage}.json")
    key, dim, train, evaluation = FEATURES[ds][feat]
    data = cfg["data"]
    assert (data["layout"], data["feature_key"], data["feature_dim"]) == (LAYOUT[ds], key, dim)
    assert (data["train_path"], data["eval_path"]) == (train, evaluation)
    assert cfg["model"]["projection_dim"] == dim
    assert (data["n_video_tokens"], data["batch_size"], data["max_words_eval"]) == (30, 64, 40)
    assert cfg["languages"] == LANGUAGES[ds]
    assert cfg["eval"]["total_queries"] == TOTAL_QUERIES[ds]
    assert data["missing_caption_fallback"] == "none"
    assert data["allow_duplicate_ids"] == (ds == "rudder")
    assert data["clean_english"] is TEACHERS_CLEAN_ENGLISH[ds] and data["student_english"] == "shared"
    assert cfg["model"]["role"] == ("teacher" if stage.startswith("teacher_") else "student")
    assert cfg["trainer"]["save_dir"] == f"runs/{ds}/{feat}"
    epochs, lr = RECIPE[ds]
    assert cfg["trainer"]["epochs"] == epochs
    t_base, t_teacher, t_c2kd = TEMPERATURE[(ds, feat)]
    words_student, words_teacher = MAX_WORDS[ds]
    if stage.startswith("teacher_"):
        teacher = stage[len("teacher_"):]
        assert cfg["stage"] == "translate-train"
        assert cfg["model"]["text_encoder"] == TEACHER_ENCODERS[teacher]
        assert cfg["optimizer"]["lr"] == TEACHER_LR.get((ds, teacher), lr)
        assert cfg["loss"]["temperature"] == t_teacher
        assert data["max_words_train"] == words_teacher
        return
    assert cfg["model"]["text_encoder"] == STUDENT
    assert cfg["optimizer"]["lr"] == lr
    assert data["max_words_train"] == words_student
    if stage == "c2kd":
        assert cfg["stage"] == "c2kd"
        assert cfg["loss"]["temperature"] == t_c2kd
        balance, distill_temp, pool = C2KD[ds]
        assert (cfg["loss"]["balance"], cfg["loss"]["distill_temp"], cfg["loss"]["teacher_pool"]) == \
            (balance, distill_temp, pool)
        # the checkpoints are where the teacher scripts write with --run-id seed0
        expected = []
        for teacher in TEACHER_ENCODERS:
            t_cfg = config(ROOT / "configs" / ds / feat / f"teacher_{teacher}.json")
            expected.append(f"{t_cfg['trainer']['save_dir']}/{t_cfg['name']}/seed0/latest.pt")
        assert cfg["teachers"]["checkpoints"] == expected
    else:
        assert cfg["stage"] == stage.replace("_", "-")
        assert cfg["loss"]["temperature"] == t_base
        assert cfg["teachers"]["checkpoints"] == []


def test_new_schema_keys():
    assert KEYS["data.missing_caption_fallback"].default == "none"
    assert set(KEYS["data.missing_caption_fallback"].choices) == {"none", "last_available"}
    with pytest.raises(ValueError, match="missing_caption_fallback"):
        resolve({"data.missing_caption_fallback": "first"})


SCRIPTS = ([ROOT / "scripts" / "teacher_training" / ds / f"{t}.sh" for ds in FEATURES for t in TEACHER_ENCODERS] +
           [ROOT / "scripts" / folder / f"{ds}.sh" for folder in
            ("zero_shot_baseline", "translate_train_baseline", "c2kd", "reproduce") for ds in FEATURES])


@pytest.mark.parametrize("script", SCRIPTS, ids=[str(p.relative_to(ROOT / "scripts")) for p in SCRIPTS])
def test_scripts(script):
    assert script.is_file(), script
    text = script.read_text()
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    ds = script.parent.name if script.parent.parent.name == "teacher_training" else script.stem
    if script.parent.name == "reproduce":
        assert f'pipeline.sh" {ds} "${{FEATURE:-{DEFAULT_FEATURE[ds]}}}" "$@"' in text
        pipeline = (ROOT / "scripts" / "reproduce" / "pipeline.sh").read_text()
        assert "utils.report" in pipeline and '"$@"' in pipeline
        return
    assert '--run-id "seed${SEED}" --seed "${SEED}" "$@"' in text
    refs = re.findall(r'-c "(configs/[^"\s]+\.json)"', text)
    assert len(refs) == 1
    for feat in FEATURES[ds]:
        resolved = refs[0].replace("${FEATURE:-%s}" % DEFAULT_FEATURE[ds], feat)
        assert (ROOT / resolved).is_file(), resolved


@pytest.mark.parametrize("flat, message", [
    ({"data.student_english": "caption_en"}, "config key 'data.student_english' = 'caption_en' is for 'data.layout' = "
                                             "'multi-youcook2' (it is 'multi-msrvtt'); set it to 'shared'"),
    ({"model.role": "mentor"}, "config key 'model.role' = \"mentor\" is not one of student, teacher"),
    ({"eval.denominator": "file_items", "eval.total_queries": 1000},
     "config key 'eval.denominator' = 'file_items' and 'eval.total_queries' both set the R@K denominator; set one "
     "of them ('eval.denominator' = 'ranked', or 'eval.total_queries' = null)"),
    ({"eval.denominator": "file_items", "eval.multi_caption": "separate"},
     "config key 'eval.denominator' = 'file_items' counts videos and needs 'eval.multi_caption' = 'average', "
     "not 'separate'"),
])
def test_reading_keys_are_checked_in_one_line(flat, message):
    with pytest.raises(ValueError) as info:
        resolve(flat)
    assert str(info.value) == message


# dataset -> what its parity preset sets: (eval.total_queries, eval.total_queries_items, eval.denominator,
# data.missing_caption_fallback, data.student_english), the reference's evaluation (docs/reference.md §1.2, §1.6)
PARITY = {"msrvtt": (1000, 968, "ranked", "none", "shared"), "vatex": (None, None, "ranked", "none", "shared"),
          "youcook2": (3350, None, "ranked", "none", "caption_en"),
          "rudder": (None, None, "file_items", "last_available", "shared")}
FEATURE_DIRS = [(ds, feat) for ds, feats in FEATURES.items() for feat in feats]


@pytest.mark.parametrize("ds, feat", FEATURE_DIRS, ids=[f"{d}/{f}" for d, f in FEATURE_DIRS])
def test_parity_presets_evaluate_as_the_reference(ds, feat):
    path = ROOT / "configs" / ds / feat / "parity.json"
    cfg, base = config(path), config(path.with_name("base.json"))
    assert (cfg["eval"]["tie_break"], cfg["eval"]["multi_caption"]) == ("optimistic", "average")
    assert (cfg["eval"]["total_queries"], cfg["eval"]["total_queries_items"], cfg["eval"]["denominator"],
            cfg["data"]["missing_caption_fallback"], cfg["data"]["student_english"]) == PARITY[ds]
    assert cfg["data"]["clean_english"] is base["data"]["clean_english"] is TEACHERS_CLEAN_ENGLISH[ds]
    # A preset changes no model key: the checkpoint's (its role among them) stay as they are.
    assert not [k for k in load_flat(path) if k.startswith("model.") and k not in load_flat(path.with_name("base.json"))]
