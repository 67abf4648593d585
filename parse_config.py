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
import math
import os
import warnings
from pathlib import Path
from typing import NamedTuple, get_args, get_origin

from data_loader.corpus import MISSING_CAPTION_FALLBACKS, READER_OPTIONS, STUDENT_ENGLISH_FIELDS
from model.loss import DISTANCES, STAGES, TEACHER_POOLS, legacy_teacher_pool
from model.metric import TIE_BREAKS
from model.model import DEFAULT_BUCKET_ROWS
from utils.errors import ConfigError  # defined at ground level; callers may also import it from here

NULLABLE = object()  # marker: the key also accepts null
LABSE = "sentence-transformers/LaBSE"  # the paper's student, whose tokenizer converted teachers pool with

# key -> (default, type(s), allowed values or None, what it means)
SCHEMA = {
    "name": (None, (str, NULLABLE), None, "run name; defaults to the config file's stem"),
    "notes": (None, (str, NULLABLE), None, "free text: where this config's values come from (not used in training)"),
    "seed": (0, int, None, "seed of every random generator"),
    "stage": ("translate-train", str, tuple(STAGES),
              "training objective (model/loss.py); the reference's command line defaulted to c2kd"),
    "languages": (None, (list[str], NULLABLE), None, "caption languages; null = every language of the training file"),
    "data.layout": ("multi-msrvtt", str, None, "reader of the data files (data_loader/corpus.py)"),
    "data.train_path": (None, (str, NULLABLE), None, "training file"),
    "data.eval_path": (None, (str, NULLABLE), None, "evaluation file"),
    "data.feature_key": ("2d", str, None, "video feature key in each item: 2d (CLIP), s3d, 2d_raw"),
    "data.feature_dim": (512, int, None, "dimension of one frame feature"),
    "data.n_video_tokens": (30, int, None, "frames kept per video (the first ones)"),
    "data.max_words_train": (35, int, None, "token length of training captions"),
    "data.max_words_eval": (40, int, None, "token length of evaluation captions"),
    "data.clean_english": (False, bool, None,
                           "the dataset's recipe: its English-input teachers (model.role = teacher) read English "
                           "captions regex-cleaned (words of [\\w']+ joined by spaces), in training and evaluation, "
                           "as the reference's MSR-VTT, VATEX and YouCook2 teachers did; false = as written, as its "
                           "RUDDER teachers did (§1.3, §9); students always read captions as written"),
    "data.student_english": ("shared", str, STUDENT_ENGLISH_FIELDS,
                             "multi-youcook2 files: shared = the student reads the item's 'caption', as the teachers "
                             "do; caption_en = it reads 'caption_en', the reference's student input, while teachers "
                             "keep 'caption' (§9)"),
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
    "model.role": ("student", str, ("student", "teacher"),
                   "teacher = an English-input teacher: it reads English captions as the dataset's teachers do "
                   "(data.clean_english, data.student_english); student = as written; other languages: as written"),
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
    "loss.balance": (0.5, float, None, "λ: weight of the contrastive terms in c2kd; 1 - λ weighs distillation "
                                       "(the reference's command line defaulted to 0.1)"),
    "loss.distill_temp": (0.1, float, None, "τd: temperature of the distillation softmaxes"),
    "loss.teacher_pool": ("max", str, tuple(TEACHER_POOLS), "how several teachers' similarities are combined"),
    "loss.distance": ("kl", str, tuple(DISTANCES),
                      "distillation distance: kl = KL of the row and column softmaxes at τd; smooth_l1 = the "
                      "TeachText ablation, SmoothL1 on raw similarities"),
    "teachers.checkpoints": ([], list[str], None, "teacher checkpoint paths (c2kd); each is a translate-train run"),
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
    "eval.total_queries_items": (None, (int, NULLABLE), None,
                                 "the number of evaluation-file items eval.total_queries is for: a file holding "
                                 "another number is scored as eval.denominator says (the reference's MSR-VTT rule: "
                                 "1000 for its 968-item file, else the rows ranked, §1.6); null = always"),
    "eval.denominator": ("ranked", str, ("ranked", "file_items"),
                         "R@K denominator when eval.total_queries is null: ranked = the queries ranked in each "
                         "language; file_items = the items of the evaluation file, also when ids repeat (the "
                         "reference's RUDDER len(data), §9)"),
    "eval.multi_caption": ("average", str, ("average", "separate"),
                           "captions sharing a video id: averaged into one query, or ranked separately"),
    "eval.rerank": ([], list[str], None,
                    "test-time re-rankers that test.py reports beside the raw scores (model/rerank.py): "
                    "dsl (dual softmax), qbnorm (querybank normalisation); [] = raw scores only"),
    "eval.rerank_dsl_temperature": (0.01, float, None,
                                    "dual softmax temperature on cosine scores (0.01: CLIP's logit scale of 100)"),
    "eval.rerank_qbnorm_beta": (20.0, float, None, "QB-Norm inverse temperature beta of the inverted softmax"),
    "eval.rerank_qbnorm_bank_size": (5000, int, None,
                                     "QB-Norm querybank: training captions drawn (seeded by 'seed'), at most this many"),
    "eval.rerank_qbnorm_bank_languages": (None, (list[str], NULLABLE), None,
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


def _legacy_role(saved):
    # Before model.role, data.clean_english said whether the model itself trained on cleaned English,
    # and training read English as written where the key was missing: a model that cleaned was a
    # teacher reading its dataset's teachers' English, any other read English as written.
    return "teacher" if saved.get("data.clean_english") is True else "student"


# What a config written before a key existed did, where that differs from the key's default (a
# function of the saved flat config where it depends on it): such a run is not the same experiment
# as one at the default (config_differences), and a checkpoint is loaded so (upgrade_saved_config).
LEGACY_VALUES = {"model.length_bucket_rows": None, "model.role": _legacy_role}

# The reference's stage names (§3.1).
STAGE_ALIASES = {"baseline-zero-shot": "zero-shot", "baseline-translate-train": "translate-train"}


def _teachtext_distance(teachtext):
    if not isinstance(teachtext, bool):
        raise ConfigError(f"config key 'loss.teachtext' must be bool, got {json.dumps(teachtext)}")
    return "smooth_l1" if teachtext else "kl"


# Keys that another key replaced: old key -> (new key, the new key's value for the old one's). Still
# read from config files, overrides and saved configs.
REPLACED_KEYS = {"loss.teachtext": ("loss.distance", _teachtext_distance)}


def _replace_old_keys(flat, warn_as=None):
    """``flat`` with every key of REPLACED_KEYS written as its new key; ``warn_as`` (a message prefix,
    None for no warning) says so in one line each."""
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


def _types(spec):
    return spec if isinstance(spec, tuple) else (spec,)


class Range(NamedTuple):
    """The values a numeric key accepts: ``low`` (excluded when ``open_low``) up to ``high``."""
    low: float = None
    high: float = None
    open_low: bool = False

    def admits(self, value):
        above = self.low is None or (value > self.low if self.open_low else value >= self.low)
        return above and (self.high is None or value <= self.high)

    def __str__(self):
        low = None if self.low is None else f"{'above' if self.open_low else 'at least'} {_number(self.low)}"
        if self.high is None:
            return f"must be {low}"
        if self.low is not None and not self.open_low:
            return f"must be between {_number(self.low)} and {_number(self.high)}"
        return f"must be {low} and at most {_number(self.high)}"


def _number(x):
    return json.dumps(int(x) if float(x).is_integer() else x)


AT_LEAST_1, AT_LEAST_0, ABOVE_0 = Range(1), Range(0), Range(0, open_low=True)
# The valid values of every numeric key of SCHEMA (tests check that none is missing), checked with
# its type before anything runs: a NaN, a negative learning rate or a zero temperature would
# otherwise train, or fail later naming a batch instead of the key.
RANGES = {
    "seed": Range(0, 2**32 - 1),  # numpy's seed range
    "data.feature_dim": AT_LEAST_1, "data.n_video_tokens": AT_LEAST_1, "data.max_words_train": AT_LEAST_1,
    "data.max_words_eval": AT_LEAST_1, "data.batch_size": AT_LEAST_1, "data.eval_batch_size": AT_LEAST_1,
    "data.num_workers": AT_LEAST_0,
    "model.width": AT_LEAST_1, "model.projection_dim": AT_LEAST_1, "model.depth": AT_LEAST_1,
    "model.heads": AT_LEAST_1, "model.mlp_ratio": ABOVE_0, "model.length_bucket_rows": AT_LEAST_1,
    "loss.temperature": ABOVE_0, "loss.distill_temp": ABOVE_0,
    "loss.balance": Range(0, 1),  # λ outside [0, 1] gives one of the two terms a negative weight
    "teachers.learnable_lr": AT_LEAST_0, "optimizer.lr": ABOVE_0,
    "scheduler.gamma": Range(0, 1, open_low=True),
    "trainer.epochs": AT_LEAST_1, "trainer.save_period": AT_LEAST_0, "trainer.log_every": AT_LEAST_1,
    "trainer.accumulation_steps": AT_LEAST_1, "trainer.max_skipped_steps": AT_LEAST_0,
    "trainer.max_steps_per_epoch": AT_LEAST_1,
    "eval.total_queries": AT_LEAST_1,
    "eval.total_queries_items": AT_LEAST_1,
    "eval.rerank_dsl_temperature": ABOVE_0, "eval.rerank_qbnorm_beta": ABOVE_0,
    "eval.rerank_qbnorm_bank_size": AT_LEAST_1,
}


def _is_instance(value, t):
    """isinstance for the schema's types: a bool is no int, and ``list[str]`` checks each item."""
    if get_origin(t) is list:
        return isinstance(value, list) and all(_is_instance(v, get_args(t)[0]) for v in value)
    return isinstance(value, t) and not (t is int and isinstance(value, bool))


def _type_name(t):
    return f"a list of {get_args(t)[0].__name__}" if get_origin(t) is list else t.__name__


def _check_value(key, value):
    default, types, choices, _ = SCHEMA[key]
    types = _types(types)
    if value is None:
        if NULLABLE not in types:
            raise ConfigError(f"config key '{key}' must not be null")
        return value
    if float in types and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not any(t is not NULLABLE and _is_instance(value, t) for t in types):
        expected = " or ".join(_type_name(t) if t is not NULLABLE else "null" for t in types)
        raise ConfigError(f"config key '{key}' must be {expected}, got {json.dumps(value)}")
    if choices is not None and value not in choices:
        raise ConfigError(f"config key '{key}' = {json.dumps(value)} is not one of {', '.join(choices)}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"config key '{key}' = {value} must be a finite number")
    if key in RANGES and not RANGES[key].admits(value):
        null = ", or null" if NULLABLE in types else ""
        raise ConfigError(f"config key '{key}' = {_number(value)} {RANGES[key]}{null}")
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


# Keys of the reference's YAML configs (§1, §5, §6 of its description): what replaces each here.
REFERENCE_KEYS = {
    "arch": "use model.* keys", "data_loader": "use data.* keys: layout, paths, feature_key, batch_size",
    "optimizer.type": "drop it: Adam always", "optimizer.args": "use optimizer.lr",
    "lr_scheduler": "use scheduler.gamma: ExponentialLR always", "loss.type": "use stage", "loss.args": "use loss.temperature",
    "metrics": "drop it: every retrieval metric is computed, see eval.* keys",
    "n_gpu": "use torchrun --nproc_per_node N", "word2vec_path": "drop it: not needed",
    "video_sampling_strategy": "drop it: the first data.n_video_tokens frames are used",
    "use_2D": "use data.feature_key", "use_3D": "use data.feature_key",
    "complete_dataset_size": "use eval.total_queries", "metric_break_ties": "use eval.tie_break",
    "max_words": "use data.max_words_train and data.max_words_eval", "n_video_tokens": "use data.n_video_tokens",
    "trainer.save_latest": "drop it: latest.pt is written every epoch", "trainer.verbosity": "drop it",
    "trainer.early_stop": "drop it", "trainer.tensorboard": "drop it",
    "trainer.resume_only_model": "drop it: -r resumes exactly; reference weights go through apps.convert_checkpoint",
}


def _reference_hint(key):
    return next((REFERENCE_KEYS[k] for k in (key, key.split(".")[0]) if k in REFERENCE_KEYS), None)


def _unknown_keys_message(path, unknown):
    """One line for every key of ``path`` outside SCHEMA, with what replaces a reference key."""
    if len(unknown) == 1 and not _reference_hint(unknown[0]):
        return f"{path}: unknown config key '{unknown[0]}'"
    listed = "; ".join(f"'{k}' ({_reference_hint(k)})" if _reference_hint(k) else f"'{k}'" for k in unknown)
    return f"{path}: {len(unknown)} unknown config keys: {listed}; every key is listed in SCHEMA in parse_config.py"


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
    unknown = [key for key in own if key not in SCHEMA and key not in REPLACED_KEYS]
    if unknown:
        raise ConfigError(_unknown_keys_message(path, unknown))
    try:
        own = _replace_old_keys(own, warn_as=f"{path}: ")
        for key, value in own.items():
            _check_value(key, STAGE_ALIASES.get(value, value) if key == "stage" else value)
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
    merged = {key: copy.deepcopy(spec[0]) for key, spec in SCHEMA.items()}
    for key, value in _replace_old_keys(flat, warn_as="").items():
        if key not in SCHEMA:
            raise ConfigError(f"unknown config key '{key}'")
        merged[key] = value
    merged["stage"] = STAGE_ALIASES.get(merged["stage"], merged["stage"])
    merged = {key: _check_value(key, value) for key, value in merged.items()}
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
        flat["loss.distance"] = _teachtext_distance(bool(args.teachtext))
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
    or flattened) differ; a key that one of them lacks counts at what runs written before the key
    existed did (LEGACY_VALUES), else at its default."""
    a, b = (_replace_old_keys(flatten_config(c)) for c in (a, b))
    differences = []
    for key in sorted(set(a) | set(b)):
        if key in ignore:
            continue
        in_a, in_b = a.get(key, value_when_missing(key, a)), b.get(key, value_when_missing(key, b))
        if in_a != in_b:
            differences.append((key, in_a, in_b))
    return differences


def value_when_missing(key, saved=None):
    """What a run whose config (flat ``saved``) lacks ``key`` (written before the key existed) ran with."""
    legacy = LEGACY_VALUES.get(key, SCHEMA[key][0] if key in SCHEMA else None)
    return legacy(saved or {}) if callable(legacy) else copy.deepcopy(legacy)


def upgrade_saved_config(config):
    """A config saved with a checkpoint or run (flat or nested, returned alike) with every schema key
    it lacks set to what runs written before that key existed did: every loader of a saved config
    reads it through here, so that an old checkpoint means the same to each of them."""
    flat = _replace_old_keys(flatten_config(config))
    upgraded = {**{key: value_when_missing(key, flat) for key in SCHEMA if key not in flat}, **flat}
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
