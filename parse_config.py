"""Experiment configuration: JSON files, inheritance, command-line overrides and validation.

A config is a JSON object. ``"extends": "other.json"`` (a path relative to the file) starts from
another config and overrides it key by key, so per-dataset and per-stage configs stay short.
``KEYS`` in config_keys.py lists every key with its default, its type and, where it matters, its
allowed values or range; a key that is not in it, a value of the wrong type or a value outside the
allowed set is reported in one line naming the key. The resolved config is saved with every run and
checkpoint, and read back through ``upgrade_saved_config``.
"""
import argparse
import copy
import json
import os
import warnings
from pathlib import Path

from config_keys import KEYS, REFERENCE_KEYS, REPLACED_KEYS, RESULT_NEUTRAL_KEYS, teachtext_distance
from data_loader.readers import READER_OPTIONS
from model.loss import legacy_teacher_pool
from common.errors import ConfigError  # defined at ground level; callers may also import it from here


def flatten_config(tree, prefix=""):
    """{"data": {"batch_size": 8}} -> {"data.batch_size": 8}, descending only into the sections of KEYS."""
    flat = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and any(k.startswith(dotted + ".") for k in KEYS):
            flat.update(flatten_config(value, dotted + "."))
        else:
            flat[dotted] = value
    return flat


def _unflatten(flat):
    tree = {}
    for dotted, value in flat.items():
        node = tree
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return tree


def read_json(path):
    """The JSON object in ``path``; a YAML file (the reference's configs) is read as YAML, so that
    ``load_flat`` can say what replaces each of its keys."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read config ({e.strerror})") from None
    if path.suffix in (".yaml", ".yml"):
        import yaml
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f"line {mark.line + 1} column {mark.column + 1}: " if mark else ""
            raise ConfigError(f"{path}: not valid YAML ({where}{getattr(e, 'problem', None) or 'unreadable'})") from None
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON (line {e.lineno} column {e.colno}: {e.msg})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config must be a JSON object")
    return data


def _reference_hint(key):
    return next((REFERENCE_KEYS[k] for k in (key, key.split(".")[0]) if k in REFERENCE_KEYS), None)


def _unknown_keys_message(path, unknown):
    """One line for every key of ``path`` outside KEYS, with what replaces a reference key."""
    if len(unknown) == 1 and not _reference_hint(unknown[0]):
        return f"{path}: unknown config key '{unknown[0]}'"
    listed = "; ".join(f"'{k}' ({_reference_hint(k)})" if _reference_hint(k) else f"'{k}'" for k in unknown)
    return f"{path}: {len(unknown)} unknown config keys: {listed}; every key is listed in KEYS in config_keys.py"


def _replace_old_keys(flat, warn_as=None):
    """``flat`` with each key of REPLACED_KEYS renamed to its new key and its value converted;
    ``warn_as`` (a prefix such as the file name, or None for no warning) says so in one line each."""
    new = {}
    for key, value in flat.items():
        if key in REPLACED_KEYS:
            new_key, convert = REPLACED_KEYS[key]
            value = convert(value)
            if warn_as is not None:
                warnings.warn(f"{warn_as}config key '{key}' is replaced by '{new_key}'; "
                              f"read as {new_key} = {json.dumps(value)}", stacklevel=3)
            key = new_key
        new[key] = value
    return new


def load_flat(path, _seen=()):
    """Flattened keys of ``path`` after following its ``extends`` chain (without defaults). Every
    unknown key is reported at once; a known key's type and range are checked here, so that the
    error names the file."""
    path = Path(path).resolve()
    if path in _seen:
        raise ConfigError(f"{path}: 'extends' forms a cycle")
    data = read_json(path)
    parent = data.pop("extends", None)
    flat = load_flat(path.parent / parent, _seen + (path,)) if parent else {}
    own = flatten_config(data)
    unknown = [key for key in own if key not in KEYS and key not in REPLACED_KEYS]
    if unknown:
        raise ConfigError(_unknown_keys_message(path, unknown))
    try:
        own = _replace_old_keys(own, warn_as=f"{path}: ")
        for key, value in own.items():
            KEYS[key].check(key, value)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    flat.update(own)
    if not _seen and parent and _looks_like_old_teacher(own) and "model.role" not in flat:
        warnings.warn(f"{path}: sets 'data.clean_english' without 'model.role'; 'model.role: teacher' is now what "
                      "makes a model read English as its dataset's teachers do (this one reads it as written)")
    return flat


def _looks_like_old_teacher(own):
    """A file that names its own text encoder and cleans English: a teacher config written before
    model.role, when data.clean_english was the model's own reading (dataset recipes set it now)."""
    return own.get("data.clean_english") is True and "model.text_encoder" in own


def resolve(flat, name=None):
    """Defaults, then ``flat``; validated; returned as a nested dict."""
    merged = {key: copy.deepcopy(spec.default) for key, spec in KEYS.items()}
    for key, value in _replace_old_keys(flat, warn_as="").items():
        if key not in KEYS:
            raise ConfigError(f"unknown config key '{key}'")
        merged[key] = value
    merged = {key: KEYS[key].check(key, value) for key, value in merged.items()}
    _check_combinations(merged)
    if merged["name"] is None:
        merged["name"] = name or "run"
    return _unflatten(merged)


def _check_combinations(flat):
    if flat["model.width"] % flat["model.heads"]:
        raise ConfigError(f"config key 'model.heads' = {flat['model.heads']} must divide 'model.width' = "
                          f"{flat['model.width']}")
    if flat["languages"] == []:
        raise ConfigError("config key 'languages' is an empty list; list the caption languages, or null for all")
    if flat["trainer.compile"] and flat["trainer.accumulation_steps"] > 1:
        raise ConfigError("config key 'trainer.compile' cannot be combined with 'trainer.accumulation_steps' > 1: "
                          "accumulation replays each micro-batch under the random state of its first, uncompiled "
                          "pass, and compiled dropout draws its masks differently")
    if flat["eval.denominator"] == "file_items" and flat["eval.total_queries"] is not None:
        raise ConfigError("config key 'eval.denominator' = 'file_items' and 'eval.total_queries' both set the R@K "
                          "denominator; set one of them ('eval.denominator' = 'ranked', or 'eval.total_queries' = null)")
    if flat["eval.denominator"] == "file_items" and flat["eval.multi_caption"] == "separate":
        raise ConfigError("config key 'eval.denominator' = 'file_items' counts videos and needs "
                          "'eval.multi_caption' = 'average', not 'separate'")
    if flat["data.student_english"] != "shared" and "student_english" not in READER_OPTIONS.get(flat["data.layout"], ()):
        takers = ", ".join(f"'{layout}'" for layout, options in READER_OPTIONS.items() if "student_english" in options)
        raise ConfigError(f"config key 'data.student_english' = '{flat['data.student_english']}' is for "
                          f"'data.layout' = {takers} (it is '{flat['data.layout']}'); set it to 'shared'")
    if flat["eval.total_queries_items"] is not None and flat["eval.total_queries"] is None:
        raise ConfigError("config key 'eval.total_queries_items' says which file 'eval.total_queries' is for; "
                          "set 'eval.total_queries' too, or 'eval.total_queries_items' = null")
    if flat["eval.total_queries"] is not None and flat["eval.multi_caption"] == "separate":
        raise ConfigError("config key 'eval.total_queries' counts videos (the reference's complete dataset size) "
                          "and needs 'eval.multi_caption' = 'average', not 'separate'")


def parse_override(text):
    """``key=value`` with the value read as JSON when it parses, else as a string."""
    if "=" not in text:
        raise ConfigError(f"--set expects key=value, got '{text}'")
    key, raw = text.split("=", 1)
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return key.strip(), value


def add_common_args(parser):
    parser.add_argument("-c", "--config", help="JSON config file")
    parser.add_argument("-r", "--resume", help="checkpoint to resume from (train) or to evaluate (test)")
    parser.add_argument("-d", "--device", help="torch device (cpu, cuda, cuda:1), or GPU indices such as 0,1 for "
                                               "CUDA_VISIBLE_DEVICES; one process uses one GPU, several need torchrun")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override any config key, e.g. --set trainer.epochs=3 (repeatable)")
    parser.add_argument("--run-id", help="name of the run folder under <trainer.save_dir>/<name>/ (default: next number)")
    parser.add_argument("--mongo", metavar="URL", help="also record the run in MongoDB (sacred MongoObserver)")
    parser.add_argument("-n", "--neptune", action="store_true", help="also record the run in Neptune (optional package)")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")


def add_train_args(parser):
    """The reference's training flags, mapped onto config keys."""
    parser.add_argument("--lr", type=float, help="optimizer.lr")
    parser.add_argument("--ep", "--epochs", dest="epochs", type=int, help="trainer.epochs")
    parser.add_argument("--bs", type=int, help="data.batch_size")
    parser.add_argument("--sp", "--save_period", dest="save_period", type=int, help="trainer.save_period")
    parser.add_argument("--stage", help="zero-shot, translate-train or c2kd (reference names accepted)")
    parser.add_argument("--seed", type=int, help="seed")
    parser.add_argument("--balance", type=float, help="loss.balance")
    parser.add_argument("--distill_temp", type=float, help="loss.distill_temp")
    parser.add_argument("--teacher_sim_pool", help="the reference's pooling names (min = element-wise max)")
    parser.add_argument("--teachtext", type=int, choices=(0, 1), help="loss.distance: 1 = smooth_l1, 0 = kl")
    parser.add_argument("--teachers", help="only 'None' (no teachers) is taken; teachers are checkpoint paths in "
                                           "teachers.checkpoints")


_FLAG_KEYS = {"lr": "optimizer.lr", "epochs": "trainer.epochs", "bs": "data.batch_size",
              "save_period": "trainer.save_period", "stage": "stage", "seed": "seed",
              "balance": "loss.balance", "distill_temp": "loss.distill_temp"}


def overrides_from_args(args):
    flat = {}
    for attr, key in _FLAG_KEYS.items():
        value = getattr(args, attr, None)
        if value is not None:
            flat[key] = value
    if getattr(args, "teacher_sim_pool", None) is not None:
        try:
            flat["loss.teacher_pool"] = legacy_teacher_pool(args.teacher_sim_pool)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    if getattr(args, "teachtext", None) is not None:
        flat["loss.distance"] = teachtext_distance(bool(args.teachtext))
    teachers = getattr(args, "teachers", None)
    if teachers == "None":
        flat["teachers.checkpoints"] = []
    elif teachers is not None:  # the reference mapped names to hard-coded checkpoint paths (docs/reference.md §5)
        raise ConfigError(f"--teachers '{teachers}': the reference's teacher names are not taken; set config key "
                          "'teachers.checkpoints' to the teacher checkpoint paths, e.g. "
                          "--set 'teachers.checkpoints=[\"a.pt\", \"b.pt\"]'")
    for text in args.set:
        key, value = parse_override(text)
        flat[key] = value
    return flat


def config_from_args(args, base_flat=None, base_source=None):
    """Resolved config: ``base_flat`` (e.g. the config saved in checkpoint ``base_source``, read as
    ``upgrade_saved_config`` reads it), then the ``-c`` file, then flags."""
    saved = upgrade_saved_config(base_flat) if base_flat is not None else None
    flat = dict(saved or {})
    name = None
    if args.config:
        flat.update(load_flat(args.config))
        name = Path(args.config).stem
    if not args.config and base_flat is None:
        raise ConfigError("no config: pass -c CONFIG.json (or -r CHECKPOINT to reuse its config)")
    flat.update(overrides_from_args(args))
    try:
        return resolve(flat, name=name)
    except ConfigError as e:
        if base_source is not None and str(e) == _resolve_error(saved):  # the saved config's own fault
            raise ConfigError(f"{e} (in the config saved in {base_source})") from None
        raise


def _resolve_error(flat):
    """The message of the ConfigError that resolving ``flat`` raises, or None."""
    with warnings.catch_warnings():  # the caller's resolve already showed them
        warnings.simplefilter("ignore")
        try:
            resolve(dict(flat))
        except ConfigError as e:
            return str(e)
    return None


def config_differences(a, b, ignore=RESULT_NEUTRAL_KEYS):
    """``[(key, value in a, value in b)]`` for every key outside ``ignore`` where two configs (nested
    or flattened, saved or resolved) differ, each read as ``upgrade_saved_config`` reads it; a key
    that both leave unused (``Key.used_when``) is absent from both."""
    a, b = (without_unused_keys(upgrade_saved_config(flatten_config(c))) for c in (a, b))
    return [(key, a.get(key), b.get(key)) for key in sorted(set(a) | set(b))
            if key not in ignore and a.get(key) != b.get(key)]


def without_unused_keys(flat):
    """A complete flat config without the keys that change nothing under it (``Key.used_when``)."""
    return {k: v for k, v in flat.items() if k not in KEYS or KEYS[k].used_when is None or KEYS[k].used_when(flat)}


def upgrade_saved_config(config):
    """A config saved with a checkpoint or run (flat or nested, returned alike) with every key of
    KEYS it lacks set to what runs written before that key existed did (``Key.legacy``, else its
    default): every reader of a saved config reads it through here, so that an old checkpoint means
    the same to each of them."""
    flat = _replace_old_keys(flatten_config(config))
    missing = {name: copy.deepcopy(key.when_missing(flat)) for name, key in KEYS.items() if name not in flat}
    upgraded = {**missing, **flat}
    return _unflatten(upgraded) if any(isinstance(v, dict) for v in config.values()) else upgraded


def select_device(arg):
    """``-d`` names a torch device, or, as in the reference, GPU indices for CUDA_VISIBLE_DEVICES."""
    import torch
    if arg and all(part.strip().isdigit() for part in arg.split(",")):
        os.environ["CUDA_VISIBLE_DEVICES"] = arg
        arg = "cuda"
    if arg is None:
        arg = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(arg)
    except RuntimeError:
        raise ConfigError(f"-d '{arg}' is not a torch device; expected cpu, cuda, cuda:N or GPU indices "
                          "such as 0,1") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"-d {arg}: CUDA is not available on this machine; use -d cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"-d {arg}: this machine has {torch.cuda.device_count()} visible GPU(s), "
                          f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    return device


def build_parser(description, train):
    parser = argparse.ArgumentParser(description=description)
    add_common_args(parser)
    if train:
        add_train_args(parser)
    return parser
