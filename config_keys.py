"""Every config key in one table (``KEYS``): its default, type, allowed values or range, what it
means, and how runs are compared and checkpoints read back with it.

Each entry also says whether the key changes results (a finished run is reused, and runs are averaged
in a report, whatever a result-neutral key says), whether a resumed run may change it or takes it from
the checkpoint, and what a config saved before the key existed ran with. Everything that needs one of
these rules reads it here: parse_config.py (checks, run comparison, saved configs), the trainer's
resume check, the report.
"""
import json
import math
from dataclasses import dataclass, field
from typing import Any, NamedTuple, get_args, get_origin

from data_loader.readers import MISSING_CAPTION_FALLBACKS, STUDENT_ENGLISH_FIELDS
from model.loss import DISTANCES, STAGES, TEACHER_POOLS, learns_teacher_weights
from model.metric import TIE_BREAKS
from model.model import DEFAULT_BUCKET_ROWS
from common.errors import ConfigError

LABSE = "sentence-transformers/LaBSE"  # the paper's student, whose tokenizer converted teachers pool with
AT_DEFAULT = object()  # marker: a config saved before the key existed ran with its default


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


def _is_instance(value, t):
    """isinstance for the table's types: a bool is no int, and ``list[str]`` checks each item."""
    if get_origin(t) is list:
        return isinstance(value, list) and all(_is_instance(v, get_args(t)[0]) for v in value)
    return isinstance(value, t) and not (t is int and isinstance(value, bool))


def _type_name(t):
    return f"a list of {get_args(t)[0].__name__}" if get_origin(t) is list else t.__name__


@dataclass(frozen=True)
class Key:
    """One config key.

    ``range``: every numeric key has one (tests check it), checked with the type before anything
    runs: a NaN, a negative learning rate or a zero temperature would otherwise train, or fail later
    naming a batch instead of the key. ``result_neutral``: the key names, places or logs a run, or is
    used by test.py only; it changes neither what a run trains nor its last-epoch results.
    ``resume_may_change``: a resumed run may change it besides the result-neutral keys (how long it
    trains, where its files are, how it computes the same steps); any other change would make one run
    record two experiments, and mid-epoch it would break the epoch's data order, which the checkpoint
    counts in batches of the saved size and seed. ``restored_on_resume``: a resumed run takes the
    setting from the checkpoint's optimizer and scheduler state, so it must not change either (the run
    would record a value never used). ``legacy``: what a config saved before the key existed ran with,
    where that differs from the default; a value, or a function of the saved flat config.
    ``aliases``: older names of values, read as the current ones. ``used_when``: a function of the
    flat config, false where the key changes nothing; two configs that both leave it unused do not
    differ in it (resume, reuse of a finished run, report rows).
    """
    default: Any
    type: type
    doc: str
    choices: tuple = None
    range: Range = None
    nullable: bool = False
    result_neutral: bool = False
    resume_may_change: bool = False
    restored_on_resume: bool = False
    legacy: Any = AT_DEFAULT
    aliases: dict = field(default_factory=dict)
    used_when: Any = None

    def __post_init__(self):
        if self.restored_on_resume and (self.resume_may_change or self.result_neutral):
            raise ValueError("a key restored on resume is compared on resume")

    def check(self, name, value):
        """``value`` (an int widened for a float key, an alias renamed) or a one-line ConfigError naming ``name``."""
        value = self.aliases.get(value, value) if isinstance(value, str) else value
        if value is None:
            if not self.nullable:
                raise ConfigError(f"config key '{name}' must not be null")
            return value
        if self.type is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not _is_instance(value, self.type):
            expected = _type_name(self.type) + (" or null" if self.nullable else "")
            raise ConfigError(f"config key '{name}' must be {expected}, got {json.dumps(value)}")
        if self.choices is not None and value not in self.choices:
            raise ConfigError(f"config key '{name}' = {json.dumps(value)} is not one of {', '.join(self.choices)}")
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"config key '{name}' = {value} must be a finite number")
        if self.range is not None and not self.range.admits(value):
            null = ", or null" if self.nullable else ""
            raise ConfigError(f"config key '{name}' = {_number(value)} {self.range}{null}")
        return value

    def when_missing(self, saved):
        """What a run whose saved flat config ``saved`` lacks this key ran with."""
        value = self.default if self.legacy is AT_DEFAULT else self.legacy
        return value(saved) if callable(value) else value


def _learns_teacher_weights(flat):
    if flat["stage"] not in STAGES or flat["loss.teacher_pool"] not in TEACHER_POOLS:
        return True  # a saved config this version cannot read: compare the key rather than guess
    return learns_teacher_weights(flat["stage"], flat["loss.teacher_pool"])


def _legacy_role(saved):
    # Before model.role, data.clean_english said whether the model itself trained on cleaned English,
    # and training read English as written where the key was missing: a model that cleaned was a
    # teacher reading its dataset's teachers' English, any other read English as written.
    return "teacher" if saved.get("data.clean_english") is True else "student"


AT_LEAST_1, AT_LEAST_0, ABOVE_0 = Range(1), Range(0), Range(0, open_low=True)

KEYS = {
    "name": Key(None, str, "run name; defaults to the config file's stem", nullable=True, result_neutral=True),
    "notes": Key(None, str, "free text: where this config's values come from (not used in training)",
                 nullable=True, result_neutral=True),
    "seed": Key(0, int, "seed of every random generator", range=Range(0, 2**32 - 1)),  # numpy's seed range
    "stage": Key("translate-train", str,
                 "training objective (model/loss.py); the reference's command line defaulted to c2kd",
                 choices=tuple(STAGES),  # the reference's stage names are read as ours (docs/reference.md §3.1)
                 aliases={"baseline-zero-shot": "zero-shot", "baseline-translate-train": "translate-train"}),
    "languages": Key(None, list[str], "caption languages; null = every language of the training file",
                     nullable=True),
    "data.layout": Key("multi-msrvtt", str, "reader of the data files (data_loader/readers.py)"),
    "data.train_path": Key(None, str, "training file", nullable=True, resume_may_change=True),
    "data.eval_path": Key(None, str, "evaluation file", nullable=True, resume_may_change=True),
    "data.feature_key": Key("2d", str, "video feature key in each item: 2d (CLIP), s3d, 2d_raw"),
    "data.feature_dim": Key(512, int, "dimension of one frame feature", range=AT_LEAST_1),
    "data.n_video_tokens": Key(30, int, "frames kept per video (the first ones)", range=AT_LEAST_1),
    "data.max_words_train": Key(35, int, "token length of training captions", range=AT_LEAST_1),
    "data.max_words_eval": Key(40, int, "token length of evaluation captions", range=AT_LEAST_1),
    "data.clean_english": Key(
        False, bool,
        "the dataset's recipe: its English-input teachers (model.role = teacher) read English captions "
        "regex-cleaned (words of [\\w']+ joined by spaces), in training and evaluation, as the reference's "
        "MSR-VTT, VATEX and YouCook2 teachers did; false = as written, as its RUDDER teachers did "
        "(docs/reference.md §1.3); students always read captions as written"),
    "data.student_english": Key(
        "shared", str,
        "multi-youcook2 files: shared = the student reads the item's 'caption', as the teachers do; "
        "caption_en = it reads 'caption_en', the reference's student input, while teachers keep 'caption' "
        "(docs/reference.md §1.2)",
        choices=STUDENT_ENGLISH_FIELDS),
    "data.batch_size": Key(64, int, "training batch size", range=AT_LEAST_1),
    "data.english_only_per_batch": Key(
        0, int,
        "English-only training items (no caption in another language) added to each global batch of "
        "data.batch_size items that have other languages; an epoch is one pass over the latter; 0 = off, "
        "all items shuffled together", range=AT_LEAST_0),
    "data.eval_batch_size": Key(64, int, "evaluation batch size (changes embeddings by float32 rounding only)",
                                range=AT_LEAST_1, result_neutral=True),
    "data.allow_duplicate_ids": Key(False, bool,
                                    "accept items sharing an id (evaluation averages them, as the reference did)"),
    "data.num_workers": Key(0, int, "DataLoader worker processes", range=AT_LEAST_0, result_neutral=True),
    "data.missing_caption_fallback": Key(
        "none", str,
        "item lacking a language: none = no caption (left out of that language's loss and evaluation); "
        "last_available = copy its last available language's caption (the reference's RUDDER behaviour; "
        "parity only)", choices=MISSING_CAPTION_FALLBACKS),
    "model.text_encoder": Key(LABSE, str, "Hugging Face hub id or local folder", resume_may_change=True),
    "model.width": Key(512, int, "video transformer width", range=AT_LEAST_1),
    "model.projection_dim": Key(512, int, "joint embedding size", range=AT_LEAST_1),
    "model.depth": Key(2, int, "video transformer blocks", range=AT_LEAST_1),
    "model.heads": Key(4, int, "attention heads per block", range=AT_LEAST_1),
    "model.mlp_ratio": Key(1.0, float, "MLP hidden size / width", range=ABOVE_0),
    "model.role": Key(
        "student", str,
        "teacher = an English-input teacher: it reads English captions as the dataset's teachers do "
        "(data.clean_english, data.student_english); student = as written; other languages: as written",
        choices=("student", "teacher"), legacy=_legacy_role),
    "model.pool_with_student_mask": Key(False, bool,
                                        "teacher pools text with the student's mask (docs/reference.md §2.3)"),
    "model.length_bucket_rows": Key(
        DEFAULT_BUCKET_ROWS, int,
        "text rows per length bucket: a text batch is sorted by caption length and run in buckets of about "
        "this many rows, each cut to its longest caption (outputs change by float rounding only, but training "
        "draws other dropout masks); null runs a batch as one bucket",
        nullable=True, range=AT_LEAST_1, resume_may_change=True, legacy=None),  # one bucket before the key
    "model.pool_mask_tokenizer": Key(
        LABSE, str,
        "with pool_with_student_mask, outside C2KD training: the tokenizer whose mask pools the text states "
        "(the reference student's; in C2KD the student's own)", resume_may_change=True),
    "loss.temperature": Key(0.05, float, "InfoNCE temperature", range=ABOVE_0),
    "loss.balance": Key(0.5, float, "λ: weight of the contrastive terms in c2kd; 1 - λ weighs distillation "
                                    "(the reference's command line defaulted to 0.1)",
                        range=Range(0, 1)),  # λ outside [0, 1] gives one of the two terms a negative weight
    "loss.distill_temp": Key(0.1, float, "τd: temperature of the distillation softmaxes", range=ABOVE_0),
    "loss.teacher_pool": Key("max", str, "how several teachers' similarities are combined", choices=tuple(TEACHER_POOLS)),
    "loss.distance": Key("kl", str, "distillation distance: kl = KL of the row and column softmaxes at τd; "
                                    "smooth_l1 = the TeachText ablation, SmoothL1 on raw similarities",
                         choices=tuple(DISTANCES)),
    "teachers.checkpoints": Key([], list[str], "teacher checkpoint paths (c2kd); each is a translate-train run",
                                resume_may_change=True),
    "teachers.mode": Key("cached", str, "cached: teacher outputs computed once before training; online: every step",
                         choices=("cached", "online"), resume_may_change=True),
    "teachers.cache_dir": Key("cache/teacher_outputs", str, "where cached teacher outputs are stored",
                              result_neutral=True),
    "teachers.learnable_lr": Key(1e-2, float, "learning rate of the learnable teacher weights", range=AT_LEAST_0,
                                 restored_on_resume=True, used_when=_learns_teacher_weights),
    "optimizer.lr": Key(1e-4, float, "Adam learning rate", range=ABOVE_0, restored_on_resume=True),
    "scheduler.gamma": Key(0.9, float, "ExponentialLR decay per epoch", range=Range(0, 1, open_low=True),
                           restored_on_resume=True),
    "trainer.epochs": Key(20, int, "training epochs", range=AT_LEAST_1, resume_may_change=True),
    "trainer.save_dir": Key("runs", str, "root of run folders: <save_dir>/<name>/<run id>/", result_neutral=True),
    "trainer.save_period": Key(0, int, "also keep checkpoint-epoch<N>.pt every N epochs; 0 = never",
                               range=AT_LEAST_0, result_neutral=True),
    # Off by default: every shipped config evaluates on its test split, so a "best" epoch would be
    # chosen on test data; the reference kept no best checkpoint and reported the last epoch (docs/reference.md §4).
    "trainer.monitor": Key("off", str, "metric that selects best.pt, e.g. t2v_mean_R1; 'off' = none",
                           result_neutral=True),
    "trainer.mixed_precision": Key("auto", str,
                                   "autocast on CUDA: auto = bf16 where supported, else fp16 with a scaler",
                                   choices=("auto", "bf16", "fp16", "off"), resume_may_change=True),
    "trainer.log_every": Key(8, int, "log the training loss every N steps", range=AT_LEAST_1, result_neutral=True),
    "trainer.accumulation_steps": Key(1, int, "micro-batches per step; gives the whole batch's gradients",
                                      range=AT_LEAST_1, resume_may_change=True),
    "trainer.compile": Key(False, bool, "wrap the model in torch.compile", resume_may_change=True),
    "trainer.max_skipped_steps": Key(50, int, "fp16: stop after the scaler skipped this many steps",
                                     range=AT_LEAST_0, resume_may_change=True),
    "trainer.max_steps_per_epoch": Key(None, int, "cap on steps per epoch (smoke runs)", nullable=True,
                                       range=AT_LEAST_1),
    "eval.tie_break": Key("averaging", str,
                          "ground truth tied with others: averaging = expected rank and R@K under a random order "
                          "of the tied items; the reference is optimistic", choices=TIE_BREAKS),
    "eval.total_queries": Key(None, int, "R@K denominator when the file lacks some queries", nullable=True,
                              range=AT_LEAST_1),
    "eval.total_queries_items": Key(
        None, int,
        "the number of evaluation-file items eval.total_queries is for: a file holding another number is "
        "scored as eval.denominator says (the reference's MSR-VTT rule: 1000 for its 968-item file, else the "
        "rows ranked, docs/reference.md §1.6); null = always", nullable=True, range=AT_LEAST_1),
    "eval.denominator": Key(
        "ranked", str,
        "R@K denominator when eval.total_queries is null: ranked = the queries ranked in each language; "
        "file_items = the items of the evaluation file, also when ids repeat (the reference's RUDDER "
        "len(data), docs/reference.md §1.6)", choices=("ranked", "file_items")),
    "eval.multi_caption": Key("average", str,
                              "captions sharing a video id: averaged into one query, or ranked separately",
                              choices=("average", "separate")),
    # Re-ranking runs in test.py only, beside the raw numbers training reports: result-neutral.
    "eval.rerank": Key([], list[str],
                       "test-time re-rankers that test.py reports beside the raw scores (model/rerank.py): dsl "
                       "(dual softmax), qbnorm (querybank normalisation); [] = raw scores only",
                       result_neutral=True),
    "eval.rerank_dsl_temperature": Key(0.01, float,
                                       "dual softmax temperature on cosine scores (0.01: CLIP's logit scale of 100)",
                                       range=ABOVE_0, result_neutral=True),
    "eval.rerank_qbnorm_beta": Key(20.0, float, "QB-Norm inverse temperature beta of the inverted softmax",
                                   range=ABOVE_0, result_neutral=True),
    "eval.rerank_qbnorm_bank_size": Key(5000, int,
                                        "QB-Norm querybank: training captions drawn (seeded by 'seed'), at most "
                                        "this many", range=AT_LEAST_1, result_neutral=True),
    "eval.rerank_qbnorm_bank_languages": Key(
        None, list[str],
        "QB-Norm querybank languages: null = each evaluation language draws from its own training captions; "
        "a list = one mix drawn evenly from these languages, used for every evaluation language",
        nullable=True, result_neutral=True),
}

# Views of the table for the checks that compare two configs.
RESULT_NEUTRAL_KEYS = frozenset(name for name, key in KEYS.items() if key.result_neutral)
RESUME_MAY_CHANGE = frozenset(name for name, key in KEYS.items() if key.result_neutral or key.resume_may_change)
RESTORED_ON_RESUME = frozenset(name for name, key in KEYS.items() if key.restored_on_resume)



def teachtext_distance(teachtext):
    if not isinstance(teachtext, bool):
        raise ConfigError(f"config key 'loss.teachtext' must be bool, got {json.dumps(teachtext)}")
    return "smooth_l1" if teachtext else "kl"


# Keys that another key replaced: old key -> (new key, the new key's value for the old one's). Still
# read from config files, overrides and saved configs (parse_config._replace_old_keys).
REPLACED_KEYS = {"loss.teachtext": ("loss.distance", teachtext_distance)}

# Keys of the reference's YAML configs (docs/reference.md §6): what replaces each here.
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
    "trainer.resume_only_model": "drop it: -r resumes exactly; reference weights go through utils.convert_checkpoint",
}
