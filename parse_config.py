"""Experiment configuration: JSON files, inheritance, command-line overrides and validation.

A config is a JSON object. ``"extends": "other.json"`` (a path relative to the file) starts from
another config and overrides it key by key, so per-dataset and per-stage configs stay short.
``SCHEMA`` below lists every key with its default, its type and, where it matters, its allowed
values; a key that is not in it, a value of the wrong type or a value outside the allowed set is
reported in one line naming the key. The resolved config is saved with every run and checkpoint.
"""
import argparse
import copy
import json
import os
import warnings
from pathlib import Path

from data_loader.corpus import MISSING_CAPTION_FALLBACKS
from model.loss import STAGES, TEACHER_POOLS, legacy_teacher_pool
from model.metric import TIE_BREAKS
from model.model import DEFAULT_BUCKET_ROWS

NULLABLE = object()  # marker: the key also accepts null
LABSE = "sentence-transformers/LaBSE"  # the paper's student, whose tokenizer converted teachers pool with

# key -> (default, type(s), allowed values or None, what it means)
SCHEMA = {
    "name": (None, (str, NULLABLE), None, "run name; defaults to the config file's stem"),
    "notes": (None, (str, NULLABLE), None, "free text: where this config's values come from (not used in training)"),
    "seed": (0, int, None, "seed of every random generator"),
    "stage": ("translate-train", str, STAGES, "training objective (model/loss.py)"),
    "languages": (None, (list, NULLABLE), None, "caption languages; null = every language of the training file"),
    "data.layout": ("multi-msrvtt", str, None, "reader of the data files (data_loader/corpus.py)"),
    "data.train_path": (None, (str, NULLABLE), None, "training file"),
    "data.eval_path": (None, (str, NULLABLE), None, "evaluation file"),
    "data.feature_key": ("2d", str, None, "video feature key in each item: 2d (CLIP), s3d, 2d_raw"),
    "data.feature_dim": (512, int, None, "dimension of one frame feature"),
    "data.n_video_tokens": (30, int, None, "frames kept per video (the first ones)"),
    "data.max_words_train": (35, int, None, "token length of training captions"),
    "data.max_words_eval": (40, int, None, "token length of evaluation captions"),
    "data.clean_english": (False, bool, None,
                           "regex-clean English captions (words of [\\w']+ joined by spaces) before tokenizing, in "
                           "training and evaluation: the reference's teachers read English so (§1.3), its students "
                           "read the raw caption; a teacher is distilled from with the setting it was trained with"),
    "data.batch_size": (64, int, None, "training batch size"),
    "data.eval_batch_size": (64, int, None, "evaluation batch size (changes embeddings by float32 rounding only)"),
    "data.allow_duplicate_ids": (False, bool, None,
                                 "accept items sharing an id (evaluation averages them, as the reference did)"),
    "data.num_workers": (0, int, None, "DataLoader worker processes"),
    "data.missing_caption_fallback": ("none", str, MISSING_CAPTION_FALLBACKS,
                                      "item lacking a language: none = no caption (left out of that language's loss "
                                      "and evaluation); last_available = copy its last available language's caption "
                                      "(the reference's RUDDER behaviour; parity only)"),
    "model.text_encoder": (LABSE, str, None, "Hugging Face hub id or local folder"),
    "model.width": (512, int, None, "video transformer width"),
    "model.projection_dim": (512, int, None, "joint embedding size"),
    "model.depth": (2, int, None, "video transformer blocks"),
    "model.heads": (4, int, None, "attention heads per block"),
    "model.mlp_ratio": (1.0, float, None, "MLP hidden size / width"),
    "model.pool_with_student_mask": (False, bool, None, "teacher pools text with the student's mask (§2.3)"),
    "model.length_bucket_rows": (DEFAULT_BUCKET_ROWS, (int, NULLABLE), None,
                                 "text rows per length bucket: a text batch is sorted by caption length and run "
                                 "in buckets of about this many rows, each cut to its longest caption (outputs "
                                 "change by float rounding only, but training draws other dropout masks); "
                                 "null runs a batch as one bucket"),
    "model.pool_mask_tokenizer": (LABSE, str, None,
                                  "with pool_with_student_mask, outside C2KD training: the tokenizer whose mask "
                                  "pools the text states (the reference student's; in C2KD the student's own)"),
    "loss.temperature": (0.05, float, None, "InfoNCE temperature"),
    "loss.balance": (0.5, float, None, "λ: weight of the contrastive terms in c2kd; 1 - λ weighs distillation"),
    "loss.distill_temp": (0.1, float, None, "τd: temperature of the distillation softmaxes"),
    "loss.teacher_pool": ("max", str, TEACHER_POOLS, "how several teachers' similarities are combined"),
    "loss.teachtext": (False, bool, None, "TeachText ablation: SmoothL1 on raw similarities instead of KL"),
    "teachers.checkpoints": ([], list, None, "teacher checkpoint paths (c2kd); each is a translate-train run"),
    "teachers.mode": ("cached", str, ("cached", "online"),
                      "cached: teacher outputs computed once before training; online: every step"),
    "teachers.cache_dir": ("cache/teacher_outputs", str, None, "where cached teacher outputs are stored"),
    "teachers.learnable_lr": (1e-2, float, None, "learning rate of the learnable teacher weights"),
    "optimizer.lr": (1e-4, float, None, "Adam learning rate"),
    "scheduler.gamma": (0.9, float, None, "ExponentialLR decay per epoch"),
    "trainer.epochs": (20, int, None, "training epochs"),
    "trainer.save_dir": ("runs", str, None, "root of run folders: <save_dir>/<name>/<run id>/"),
    "trainer.save_period": (0, int, None, "also keep checkpoint-epoch<N>.pt every N epochs; 0 = never"),
    # Off by default: every shipped config evaluates on its test split, so a "best" epoch would be
    # chosen on test data; the reference kept no best checkpoint and reported the last epoch (§4).
    "trainer.monitor": ("off", str, None, "metric that selects best.pt, e.g. t2v_mean_R1; 'off' = none"),
    "trainer.mixed_precision": ("auto", str, ("auto", "bf16", "fp16", "off"),
                                "autocast on CUDA: auto = bf16 where supported, else fp16 with a scaler"),
    "trainer.log_every": (8, int, None, "log the training loss every N steps"),
    "trainer.accumulation_steps": (1, int, None, "micro-batches per step; gives the whole batch's gradients"),
    "trainer.compile": (False, bool, None, "wrap the model in torch.compile"),
    "trainer.max_skipped_steps": (50, int, None, "fp16: stop after the scaler skipped this many steps"),
    "trainer.max_steps_per_epoch": (None, (int, NULLABLE), None, "cap on steps per epoch (smoke runs)"),
    "eval.tie_break": ("averaging", str, TIE_BREAKS,
                       "ground truth tied with others: averaging = expected rank and R@K under a random "
                       "order of the tied items; the reference is optimistic"),
    "eval.total_queries": (None, (int, NULLABLE), None, "R@K denominator when the file lacks some queries"),
    "eval.multi_caption": ("average", str, ("average", "separate"),
                           "captions sharing a video id: averaged into one query, or ranked separately"),
    "eval.rerank": ([], list, None,
                    "test-time re-rankers that test.py reports beside the raw scores (model/rerank.py): "
                    "dsl (dual softmax), qbnorm (querybank normalisation); [] = raw scores only"),
    "eval.rerank_dsl_temperature": (0.01, float, None,
                                    "dual softmax temperature on cosine scores (0.01: CLIP's logit scale of 100)"),
    "eval.rerank_qbnorm_beta": (20.0, float, None, "QB-Norm inverse temperature beta of the inverted softmax"),
    "eval.rerank_qbnorm_bank_size": (5000, int, None,
                                     "QB-Norm querybank: training captions drawn (seeded by 'seed'), at most this many"),
    "eval.rerank_qbnorm_bank_languages": (None, (list, NULLABLE), None,
                                          "QB-Norm querybank languages: null = each evaluation language draws "
                                          "from its own training captions; a list = one mix drawn evenly from "
                                          "these languages, used for every evaluation language"),
}

# Keys that change neither what a run trains nor its last-epoch results (they name, place or log
# it): a finished run is reused, and runs are averaged in a report, whatever they say.
RESULT_NEUTRAL_KEYS = frozenset({
    "name", "notes", "trainer.save_dir", "trainer.save_period", "trainer.log_every", "trainer.monitor",
    "data.num_workers", "data.eval_batch_size", "teachers.cache_dir",
    # Re-ranking runs in test.py only, beside the raw numbers training reports.
    "eval.rerank", "eval.rerank_dsl_temperature", "eval.rerank_qbnorm_beta", "eval.rerank_qbnorm_bank_size",
    "eval.rerank_qbnorm_bank_languages",
})

# What a config written before a key existed did, where that differs from the key's default: such a
# run is not the same experiment as one at the default (config_differences).
LEGACY_VALUES = {"model.length_bucket_rows": None}

# The reference's stage names (§3.1).
STAGE_ALIASES = {"baseline-zero-shot": "zero-shot", "baseline-translate-train": "translate-train"}


class ConfigError(ValueError):
    """A config file, key or value is invalid; the message names it."""


def _types(spec):
    return spec if isinstance(spec, tuple) else (spec,)


def _check_value(key, value):
    default, types, choices, _ = SCHEMA[key]
    types = _types(types)
    if value is None:
        if NULLABLE not in types:
            raise ConfigError(f"config key '{key}' must not be null")
        return value
    if float in types and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    ok = any(t is not NULLABLE and isinstance(value, t) and not (t is int and isinstance(value, bool))
             for t in types)
    if not ok:
        expected = " or ".join(t.__name__ for t in types if t is not NULLABLE)
        raise ConfigError(f"config key '{key}' must be {expected}, got {json.dumps(value)}")
    if choices is not None and value not in choices:
        raise ConfigError(f"config key '{key}' = {json.dumps(value)} is not one of {', '.join(choices)}")
    return value


def flatten_config(tree, prefix=""):
    """{"data": {"batch_size": 8}} -> {"data.batch_size": 8}, descending only into schema sections."""
    flat = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and any(k.startswith(dotted + ".") for k in SCHEMA):
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
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read config ({e.strerror})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON (line {e.lineno} column {e.colno}: {e.msg})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config must be a JSON object")
    return data


def load_flat(path, _seen=()):
    """Flattened keys of ``path`` after following its ``extends`` chain (without defaults)."""
    path = Path(path).resolve()
    if path in _seen:
        raise ConfigError(f"{path}: 'extends' forms a cycle")
    data = read_json(path)
    parent = data.pop("extends", None)
    flat = load_flat(path.parent / parent, _seen + (path,)) if parent else {}
    own = flatten_config(data)
    for key in own:
        if key not in SCHEMA:
            raise ConfigError(f"{path}: unknown config key '{key}'")
    flat.update(own)
    return flat


def resolve(flat, name=None):
    """Defaults, then ``flat``; validated; returned as a nested dict."""
    merged = {key: copy.deepcopy(spec[0]) for key, spec in SCHEMA.items()}
    for key, value in flat.items():
        if key not in SCHEMA:
            raise ConfigError(f"unknown config key '{key}'")
        merged[key] = value
    merged["stage"] = STAGE_ALIASES.get(merged["stage"], merged["stage"])
    merged = {key: _check_value(key, value) for key, value in merged.items()}
    _check_combinations(merged)
    if merged["name"] is None:
        merged["name"] = name or "run"
    return _unflatten(merged)


# Counts and sizes that must be at least 1 (0 would train or evaluate nothing, or crash later).
POSITIVE_KEYS = ("trainer.epochs", "trainer.accumulation_steps", "trainer.log_every", "data.batch_size",
                 "data.eval_batch_size", "data.n_video_tokens", "data.max_words_train", "data.max_words_eval",
                 "model.width", "model.projection_dim", "model.depth", "model.heads",
                 "trainer.max_steps_per_epoch", "model.length_bucket_rows")  # these two may also be null


def _check_combinations(flat):
    for key in POSITIVE_KEYS:
        if flat[key] is not None and flat[key] < 1:
            null = ", or null" if NULLABLE in _types(SCHEMA[key][1]) else ""
            raise ConfigError(f"config key '{key}' = {flat[key]} must be at least 1{null}")
    if not 0 <= flat["seed"] < 2**32:  # numpy's seed range
        raise ConfigError(f"config key 'seed' = {flat['seed']} must be between 0 and 2**32 - 1")
    if flat["model.width"] % flat["model.heads"]:
        raise ConfigError(f"config key 'model.heads' = {flat['model.heads']} must divide 'model.width' = "
                          f"{flat['model.width']}")
    if flat["languages"] == []:
        raise ConfigError("config key 'languages' is an empty list; list the caption languages, or null for all")
    if flat["trainer.compile"] and flat["trainer.accumulation_steps"] > 1:
        raise ConfigError("config key 'trainer.compile' cannot be combined with 'trainer.accumulation_steps' > 1: "
                          "accumulation replays each micro-batch under the random state of its first, uncompiled "
                          "pass, and compiled dropout draws its masks differently")
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
    parser.add_argument("--teachtext", type=int, choices=(0, 1), help="loss.teachtext")
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
        flat["loss.teachtext"] = bool(args.teachtext)
    teachers = getattr(args, "teachers", None)
    if teachers == "None":
        flat["teachers.checkpoints"] = []
    elif teachers is not None:  # the reference mapped names to hard-coded checkpoint paths (§5)
        raise ConfigError(f"--teachers '{teachers}': the reference's teacher names are not taken; set config key "
                          "'teachers.checkpoints' to the teacher checkpoint paths, e.g. "
                          "--set 'teachers.checkpoints=[\"a.pt\", \"b.pt\"]'")
    for text in args.set:
        key, value = parse_override(text)
        flat[key] = value
    return flat


def config_from_args(args, base_flat=None, base_source=None):
    """Resolved config: ``base_flat`` (e.g. the config saved in checkpoint ``base_source``), then
    the ``-c`` file, then flags."""
    flat = dict(base_flat or {})
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
        if base_source is not None and str(e) == _resolve_error(base_flat):  # the saved config's own fault
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
    or flattened) differ; a key that one of them lacks counts at what runs written before the key
    existed did (LEGACY_VALUES), else at its default."""
    a, b = flatten_config(a), flatten_config(b)
    differences = []
    for key in sorted(set(a) | set(b)):
        if key in ignore:
            continue
        missing = value_when_missing(key)
        if a.get(key, missing) != b.get(key, missing):
            differences.append((key, a.get(key, missing), b.get(key, missing)))
    return differences


def value_when_missing(key):
    """What a run whose config lacks ``key`` (written before the key existed) ran with."""
    return LEGACY_VALUES.get(key, SCHEMA[key][0] if key in SCHEMA else None)


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
