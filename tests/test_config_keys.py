"""The table of config keys (config_keys.py) carries the rules that compare runs and read saved
configs: each test changes or drops every key of the table and checks what the real check does."""
import copy
import json

import pytest

from config_keys import KEYS, RESTORED_ON_RESUME, Key
from parse_config import ConfigError, flatten_config, resolve, upgrade_saved_config
from trainer.experiment import existing_run
from trainer.trainer import check_resumable


def another_value(key):
    """A value of ``key``'s type other than its default (not necessarily one that resolves)."""
    if key.type is bool:
        return not key.default
    if key.type in (int, float):
        return key.type((key.default or 1) * 2)
    if key.type is str:
        return f"{key.default or ''}x"
    return (key.default or []) + ["x"]


def changed(config, name, value):
    """A copy of the nested ``config`` with key ``name`` set to ``value``."""
    config = copy.deepcopy(config)
    *sections, leaf = name.split(".")
    node = config
    for section in sections:
        node = node[section]
    node[leaf] = value
    return config


def test_a_finished_run_is_reused_whatever_its_result_neutral_keys_say(tmp_path):
    """train.py --run-id reuses a finished run when the config differs in result-neutral keys only;
    a change to any other key is refused, naming the key."""
    recorded = resolve({"stage": "c2kd", "loss.teacher_pool": "learnable"})  # every key is used
    (tmp_path / "config.json").write_text(json.dumps(recorded))
    (tmp_path / "run.json").write_text(json.dumps({"status": "COMPLETED"}))
    neutral = set()
    for name, key in KEYS.items():
        config = changed(recorded, name, another_value(key))
        try:
            assert existing_run(tmp_path, config) == "finished"
            neutral.add(name)
        except ConfigError as e:
            assert f"{name}: " in str(e)
    assert neutral == {name for name, key in KEYS.items() if key.result_neutral}
    assert {"name", "trainer.save_dir", "data.num_workers", "eval.rerank"} <= neutral
    # A key the run leaves unused (Key.used_when) is no difference either.
    (tmp_path / "config.json").write_text(json.dumps(resolve({"stage": "c2kd"})))
    assert existing_run(tmp_path, resolve({"stage": "c2kd", "teachers.learnable_lr": 0.5})) == "finished"


def test_a_resumed_run_may_change_only_the_keys_the_table_allows():
    """check_resumable lets a resumed run change a result-neutral key or one marked resume_may_change,
    and refuses any other change; a key restored from the checkpoint is refused for that reason."""
    saved = resolve({"stage": "c2kd", "loss.teacher_pool": "learnable"})  # learnable_lr is used
    allowed = set()
    for name, key in KEYS.items():
        config = changed(saved, name, another_value(key))
        try:
            check_resumable(saved, config, "c.pt")
            allowed.add(name)
        except ConfigError as e:
            why = "continues the saved optimizer" if key.restored_on_resume else "continues the same experiment"
            assert f"config key '{name}' = " in str(e) and why in str(e), str(e)
    assert allowed == {name for name, key in KEYS.items() if key.result_neutral or key.resume_may_change}
    assert RESTORED_ON_RESUME == {"optimizer.lr", "scheduler.gamma", "teachers.learnable_lr"}


def test_a_key_missing_from_a_saved_config_reads_at_its_legacy_value_else_at_its_default():
    """A config saved before a key existed is read with the key's legacy value where the table gives
    one (a value, or a function of the saved config), and at its default otherwise: never an error."""
    saved = flatten_config(resolve({"data.clean_english": True, "model.role": "teacher"}))
    old = {name: value for name, value in saved.items()
           if name not in ("model.length_bucket_rows", "model.role", "trainer.max_skipped_steps")}
    upgraded = upgrade_saved_config(old)
    assert upgraded["model.length_bucket_rows"] is None          # ran as one bucket
    assert upgraded["model.role"] == "teacher"                   # it cleaned its own English
    assert upgraded["trainer.max_skipped_steps"] == KEYS["trainer.max_skipped_steps"].default
    assert upgrade_saved_config({"data": {"clean_english": False}})["model"]["role"] == "student"
    empty = upgrade_saved_config({})  # every key, each at its legacy value or default
    assert set(empty) == set(KEYS) and empty["model.role"] == "student" and empty["model.length_bucket_rows"] is None
    assert upgrade_saved_config(saved) == saved                  # a current config is read as saved


def test_a_value_alias_is_read_as_the_current_value():
    assert resolve({"stage": "baseline-translate-train"})["stage"] == "translate-train"
    assert KEYS["stage"].check("stage", "baseline-zero-shot") == "zero-shot"
    with pytest.raises(ConfigError, match="config key 'stage' = \"baseline-c2kd\" is not one of"):
        resolve({"stage": "baseline-c2kd"})


def test_a_key_restored_on_resume_cannot_be_allowed_to_change():
    with pytest.raises(ValueError, match="restored on resume"):
        Key(0.1, float, "a rate", restored_on_resume=True, resume_may_change=True)
