"""Config files, inheritance, overrides and one-line errors."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from parse_config import ConfigError, build_parser, config_from_args, load_flat, resolve

ROOT = Path(__file__).resolve().parents[1]


def args_for(*argv):
    return build_parser("test", train=True).parse_args(list(argv))


def write(tmp_path, name, data):
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


def test_extends_overrides_and_reference_flags(tmp_path):
    write(tmp_path, "base.json", {"data": {"batch_size": 32, "feature_key": "s3d"}, "loss": {"temperature": 0.1}})
    child = write(tmp_path, "child.json", {"extends": "base.json", "data": {"batch_size": 16}})
    config = config_from_args(args_for("-c", str(child), "--lr", "3e-4", "--epochs", "5", "--bs", "8",
                                       "--stage", "baseline-zero-shot", "--set", "eval.tie_break=optimistic",
                                       "--set", "languages=[\"en\",\"de\"]"))
    assert config["name"] == "child"
    assert config["data"]["batch_size"] == 8            # --bs beats the file
    assert config["data"]["feature_key"] == "s3d"       # inherited
    assert config["loss"]["temperature"] == 0.1
    assert config["optimizer"]["lr"] == 3e-4 and config["trainer"]["epochs"] == 5
    assert config["stage"] == "zero-shot"               # the reference's stage name is mapped
    assert config["eval"]["tie_break"] == "optimistic"
    assert config["languages"] == ["en", "de"]


def test_teacher_sim_pool_flag_maps_reference_names(tmp_path):
    path = write(tmp_path, "c.json", {"stage": "c2kd"})
    with pytest.warns(UserWarning, match="element-wise max"):
        config = config_from_args(args_for("-c", str(path), "--teacher_sim_pool", "min", "--teachtext", "1",
                                           "--balance", "0.1", "--distill_temp", "0.2"))
    assert config["loss"]["teacher_pool"] == "max"
    assert config["loss"]["distance"] == "smooth_l1"
    assert config["loss"]["balance"] == 0.1 and config["loss"]["distill_temp"] == 0.2


def test_teachers_flag_takes_none_and_refuses_reference_names(tmp_path):
    path = write(tmp_path, "c.json", {"stage": "translate-train", "teachers": {"checkpoints": ["t.pt"]}})
    assert config_from_args(args_for("-c", str(path), "--teachers", "None"))["teachers"]["checkpoints"] == []
    with pytest.raises(ConfigError, match=r"--teachers 'xlm,mbert': .* set config key 'teachers.checkpoints'"):
        config_from_args(args_for("-c", str(path), "--teachers", "xlm,mbert"))


@pytest.mark.parametrize("content, message", [
    ({"data": {"batchsize": 3}}, "unknown config key 'data.batchsize'"),
    ({"trainer": {"epochs": "ten"}}, "config key 'trainer.epochs' must be int, got \"ten\""),
    ({"trainer": {"epochs": True}}, "config key 'trainer.epochs' must be int, got true"),
    ({"eval": {"tie_break": "random"}}, "config key 'eval.tie_break' = \"random\" is not one of"),
    ({"stage": "c3kd"}, "config key 'stage' = \"c3kd\" is not one of"),
    ({"trainer": {"epochs": 0}}, "config key 'trainer.epochs' = 0 must be at least 1"),
    ({"data": {"batch_size": -8}}, "config key 'data.batch_size' = -8 must be at least 1"),
    ({"model": {"depth": None}}, "config key 'model.depth' must not be null"),
    ('{"data": {', "not valid JSON (line 1 column 11"),
    ("[1, 2]", "a config must be a JSON object"),
    ({"trainer": {"compile": True, "accumulation_steps": 2}},
     "config key 'trainer.compile' cannot be combined with 'trainer.accumulation_steps' > 1"),
    ({"languages": []}, "config key 'languages' is an empty list"),
    ({"trainer": {"max_steps_per_epoch": 0}}, "config key 'trainer.max_steps_per_epoch' = 0 must be at least 1"),
    ({"model": {"length_bucket_rows": 0}}, "config key 'model.length_bucket_rows' = 0 must be at least 1, or null"),
    ({"seed": -1}, "config key 'seed' = -1 must be between 0 and 4294967295"),
    ({"model": {"width": 100, "heads": 3}}, "config key 'model.heads' = 3 must divide 'model.width' = 100"),
    ({"eval": {"total_queries": 1000, "multi_caption": "separate"}},
     "config key 'eval.total_queries' counts videos"),
])
def test_bad_configs_are_reported_in_one_line(tmp_path, content, message):
    path = write(tmp_path, "bad.json", content)
    with pytest.raises(ConfigError) as info:
        resolve(load_flat(path))
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_every_numeric_key_has_a_range():
    from config_keys import KEYS
    numeric = {name for name, key in KEYS.items() if key.type in (int, float)}
    assert numeric == {name for name, key in KEYS.items() if key.range is not None}


@pytest.mark.parametrize("flat, message", [
    ({"optimizer.lr": -1e-4}, "config key 'optimizer.lr' = -0.0001 must be above 0"),
    ({"optimizer.lr": float("nan")}, "config key 'optimizer.lr' = nan must be a finite number"),
    ({"loss.balance": 2.5}, "config key 'loss.balance' = 2.5 must be between 0 and 1"),
    ({"loss.balance": -0.1}, "config key 'loss.balance' = -0.1 must be between 0 and 1"),
    ({"loss.temperature": 0}, "config key 'loss.temperature' = 0 must be above 0"),
    ({"loss.distill_temp": -0.1}, "config key 'loss.distill_temp' = -0.1 must be above 0"),
    ({"loss.distill_temp": float("inf")}, "config key 'loss.distill_temp' = inf must be a finite number"),
    ({"scheduler.gamma": 0}, "config key 'scheduler.gamma' = 0 must be above 0 and at most 1"),
    ({"scheduler.gamma": 1.5}, "config key 'scheduler.gamma' = 1.5 must be above 0 and at most 1"),
    ({"model.mlp_ratio": 0}, "config key 'model.mlp_ratio' = 0 must be above 0"),
    ({"data.num_workers": -1}, "config key 'data.num_workers' = -1 must be at least 0"),
    ({"trainer.save_period": -2}, "config key 'trainer.save_period' = -2 must be at least 0"),
    ({"eval.total_queries": 0}, "config key 'eval.total_queries' = 0 must be at least 1, or null"),
    ({"seed": 2**32}, "config key 'seed' = 4294967296 must be between 0 and 4294967295"),
    ({"languages": [1, 2]}, "config key 'languages' must be a list of str or null, got [1, 2]"),
    ({"teachers.checkpoints": "a.pt"}, "config key 'teachers.checkpoints' must be a list of str, got \"a.pt\""),
])
def test_values_outside_a_keys_range_or_type_are_refused(flat, message):
    with pytest.raises(ConfigError) as info:
        resolve(flat)
    assert str(info.value) == message
    assert resolve({"loss.balance": 0, "scheduler.gamma": 1, "data.num_workers": 0})  # the bounds themselves


def test_a_reference_config_lists_every_unknown_key_and_its_replacement(tmp_path):
    reference = write(tmp_path, "23_msrvtt_c2kd.yaml", "\n".join([
        "name: 23_msrvtt_c2kd", "n_gpu: 1", "arch: {type: AVLnet, args: {}}",
        "data_loader: [{type: FeatureDataloader, args: {batch_size: 64}}]",
        "optimizer: {type: Adam, args: {lr: 0.0001}}", "lr_scheduler: {type: ExponentialLR, args: {gamma: 0.9}}",
        "trainer: {epochs: 20, save_latest: true, verbosity: 2}", "word2vec_path: ./data/w2v.bin"]))
    with pytest.raises(ConfigError) as info:
        load_flat(reference)
    message = str(info.value)
    assert message.startswith(f"{reference}: 9 unknown config keys: 'n_gpu' (use torchrun --nproc_per_node N); "
                              "'arch' (use model.* keys); ") and "\n" not in message
    for key, replacement in (("optimizer.args", "use optimizer.lr"), ("lr_scheduler", "use scheduler.gamma"),
                             ("trainer.save_latest", "drop it: latest.pt is written every epoch"),
                             ("word2vec_path", "drop it: not needed"), ("data_loader", "use data.* keys")):
        assert f"'{key}' ({replacement}" in message, key


def test_bad_override_names_the_key(tmp_path):
    path = write(tmp_path, "ok.json", {})
    with pytest.raises(ConfigError, match="unknown config key 'optimiser.lr'"):
        config_from_args(args_for("-c", str(path), "--set", "optimiser.lr=1"))
    with pytest.raises(ConfigError, match="--set expects key=value"):
        config_from_args(args_for("-c", str(path), "--set", "optimizer.lr"))


def test_extends_cycle_is_reported(tmp_path):
    write(tmp_path, "a.json", {"extends": "b.json"})
    write(tmp_path, "b.json", {"extends": "a.json"})
    with pytest.raises(ConfigError, match="cycle"):
        load_flat(tmp_path / "a.json")


def test_train_cli_prints_one_line_and_exits_2(tmp_path):
    path = write(tmp_path, "bad.json", {"trainer": {"epochs": -1.5}})
    result = subprocess.run([sys.executable, "train.py", "-c", str(path)], cwd=ROOT, capture_output=True,
                            text=True)
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: {path}: config key 'trainer.epochs' must be int, got -1.5"
    assert "Traceback" not in result.stderr


def test_cli_warnings_are_one_line(tmp_path):
    path = write(tmp_path, "c.json", {"stage": "c2kd", "data": {"train_path": str(tmp_path / "missing.pkl")},
                                      "trainer": {"save_dir": str(tmp_path / "runs")}})
    result = subprocess.run([sys.executable, "train.py", "-c", str(path), "--teacher_sim_pool", "min", "-d", "cpu"],
                            cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "warning: --teacher_sim_pool min computed the element-wise max over teachers in the reference; "
        "using loss.teacher_pool = 'max'",
        f"error: {tmp_path / 'missing.pkl'}: file not found"]


def test_optional_observers_fail_with_an_install_hint(tmp_path):
    import importlib.util
    path = write(tmp_path, "ok.json", {"trainer": {"save_dir": str(tmp_path / "runs")}})
    cases = [("-n", "neptune", "needs the optional neptune package")]  # pymongo is in requirements
    missing = [case for case in cases if importlib.util.find_spec(case[1]) is None]
    if not missing:
        pytest.skip("neptune is installed here")
    for flag, module, message in missing:
        result = subprocess.run([sys.executable, "train.py", "-c", str(path), flag], cwd=ROOT,
                                capture_output=True, text=True)
        assert result.returncode == 2 and message in result.stderr and "\n" not in result.stderr.strip()


def test_config_differences_ignore_settings_that_change_no_result():
    from config_keys import RESULT_NEUTRAL_KEYS
    from parse_config import config_differences, flatten_config, resolve
    config = resolve({"trainer.epochs": 3})
    recorded = resolve({"trainer.epochs": 3, "data.num_workers": 4, "data.eval_batch_size": 7, "notes": "x"})
    assert config_differences(recorded, config) == []
    del recorded["data"]["clean_english"]  # a run recorded before the key existed: read at its default
    assert config_differences(recorded, config) == []
    assert config_differences(recorded, resolve({"trainer.epochs": 4, "optimizer.lr": 2e-4})) == [
        ("optimizer.lr", 1e-4, 2e-4), ("trainer.epochs", 3, 4)]
    assert set(RESULT_NEUTRAL_KEYS) <= set(flatten_config(config))
    # Runs recorded before text ran in length buckets ran as one bucket, not at today's default.
    del recorded["model"]["length_bucket_rows"]
    assert config_differences(recorded, config) == [("model.length_bucket_rows", None, 128)]
    assert config_differences(recorded, resolve({"trainer.epochs": 3, "model.length_bucket_rows": None})) == []


def test_a_key_both_configs_leave_unused_is_no_difference():
    from parse_config import config_differences, resolve
    # teachers.learnable_lr only acts where a distilling loss learns teacher weights.
    for base in ({"stage": "c2kd"}, {"stage": "translate-train", "loss.teacher_pool": "learnable"}):
        assert config_differences(resolve({**base, "teachers.learnable_lr": 0.5}), resolve(base)) == []
    learnable = {"stage": "c2kd", "loss.teacher_pool": "learnable"}
    assert config_differences(resolve({**learnable, "teachers.learnable_lr": 0.5}), resolve(learnable)) == [
        ("teachers.learnable_lr", 0.5, 1e-2)]
    assert config_differences(resolve({"stage": "c2kd", "teachers.learnable_lr": 0.5}), resolve(learnable)) == [
        ("loss.teacher_pool", "max", "learnable"), ("teachers.learnable_lr", None, 1e-2)]  # unused: absent


def test_a_teacher_config_written_before_model_role_is_warned_about(tmp_path, recwarn):
    """A config that cleans English for its own text encoder, without model.role, was a teacher
    config: it is told once that model.role now makes a model read English as teachers do."""
    write(tmp_path, "base.json", {"data": {"clean_english": True}})
    old = write(tmp_path, "old_teacher.json", {"extends": "base.json", "model": {"text_encoder": "x"},
                                               "data": {"clean_english": True}})
    new = write(tmp_path, "teacher.json", {"extends": "old_teacher.json", "model": {"role": "teacher"}})
    student = write(tmp_path, "student.json", {"extends": "base.json", "model": {"text_encoder": "x"}})
    for path in (new, student, tmp_path / "base.json"):
        load_flat(path)
    assert not recwarn.list
    load_flat(old)
    assert [str(w.message).split(": ", 1)[1][:50] for w in recwarn.list] == [
        "sets 'data.clean_english' without 'model.role'; 'm"]
    assert str(recwarn.list[0].message).startswith(str(old))


def test_teachtext_flag_sets_the_distance(tmp_path):
    path = write(tmp_path, "c.json", {"stage": "c2kd", "loss": {"distance": "smooth_l1"}})
    assert config_from_args(args_for("-c", str(path)))["loss"]["distance"] == "smooth_l1"
    assert config_from_args(args_for("-c", str(path), "--teachtext", "0"))["loss"]["distance"] == "kl"
    assert config_from_args(args_for("-c", str(write(tmp_path, "d.json", {})), "--teachtext", "1"))["loss"] == \
        resolve({"loss.distance": "smooth_l1"})["loss"]


@pytest.mark.parametrize("teachtext, distance", [(True, "smooth_l1"), (False, "kl")])
def test_the_legacy_teachtext_key_is_read_as_the_distance_with_a_warning(tmp_path, teachtext, distance):
    path = write(tmp_path, "old.json", {"stage": "c2kd", "loss": {"teachtext": teachtext}})
    with pytest.warns(UserWarning) as warned:
        config = config_from_args(args_for("-c", str(path)))
    assert [str(w.message) for w in warned] == [
        f"{path}: config key 'loss.teachtext' is replaced by 'loss.distance'; read as loss.distance = \"{distance}\""]
    assert config["loss"]["distance"] == distance and "teachtext" not in config["loss"]
    with pytest.warns(UserWarning, match="config key 'loss.teachtext' is replaced by 'loss.distance'"):
        assert resolve({"loss.teachtext": teachtext})["loss"]["distance"] == distance
    with pytest.raises(ConfigError, match=f"{path}: config key 'loss.teachtext' must be bool, got \"yes\""):
        load_flat(write(tmp_path, "old.json", {"loss": {"teachtext": "yes"}}))


def test_a_config_saved_with_teachtext_upgrades_to_the_distance():
    from parse_config import config_differences, upgrade_saved_config
    saved = resolve({"stage": "c2kd", "loss.distance": "smooth_l1"})
    del saved["loss"]["distance"]
    saved["loss"]["teachtext"] = True  # as a checkpoint written before loss.distance holds it
    upgraded = upgrade_saved_config(saved)
    assert upgraded["loss"]["distance"] == "smooth_l1" and "teachtext" not in upgraded["loss"]
    assert config_differences(saved, resolve({"stage": "c2kd", "loss.distance": "smooth_l1"})) == []
    assert config_differences(saved, resolve({"stage": "c2kd"})) == [("loss.distance", "smooth_l1", "kl")]

