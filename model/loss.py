"""Losses of every training stage: symmetric InfoNCE and the C2KD distillation (docs/reference.md §3).

Notation: S_l is the student's cosine-similarity matrix between the batch's captions in language
l and the batch's videos; T is the teachers' matrix from the English captions of the same items.

- zero-shot:       L = NCE(S_en)
- translate-train: L = NCE(S_en) + sum_{l != en} NCE(S_l)                 (unnormalised, as the reference)
- c2kd:            L = λ NCE(S_en) + sum_l [λ NCE(S_l) + sum_t w_t D(S_l, T_t)]  (English included in the sum)

Each stage is a loss class, registered in STAGES under the config's ``stage``. D is the
``loss.distance`` (DISTANCES): ``kl``, KL(softmax(T/τd) || softmax(S/τd)) over rows plus the same
over columns, or ``smooth_l1``, the TeachText SmoothL1 on raw similarities. The teacher pooling
(``loss.teacher_pool``, TEACHER_POOLS) decides the targets T_t and their weights w_t. Adding a
stage, a distance or a pooling means adding it here and to its registry.

Each term runs over the items its row mask keeps (RowMasks; 0 when it keeps none). Similarities are float32
even under autocast (``similarity``), so every term is too.
"""
import warnings
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from data_loader.corpus import ENGLISH
from common.distributed import gather, gather_with_grad, world_size


def similarity(a, b):
    """``a @ b.T`` in float32 (float64 inputs stay float64) whatever autocast encloses the call: a
    bf16 product is off by ~2e-3, 0.04 in a logit at temperature 0.05. Every similarity of the loss
    and of the teacher targets is computed here."""
    with torch.autocast(a.device.type, enabled=False):
        return _at_least_float32(a) @ _at_least_float32(b).t()


def cosine_sim(a, b):
    return similarity(F.normalize(_at_least_float32(a), dim=-1, eps=1e-8),
                      F.normalize(_at_least_float32(b), dim=-1, eps=1e-8))


def info_nce(sims, temperature, keep=None):
    """Cross-entropy of the diagonal over rows plus over columns: the two directions are summed
    (the reference's NormSoftmaxLoss). ``keep`` ([B] bool) restricts it to the kept items, as on
    the sub-matrix of their rows and columns; over no items it is 0."""
    logits = sims / temperature
    if keep is None:
        target = torch.arange(sims.shape[0], device=sims.device)
        return F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)
    diag = logits.diagonal()
    rows = torch.logsumexp(_drop_columns(logits, keep), dim=1) - diag
    cols = torch.logsumexp(_drop_columns(logits.t(), keep), dim=1) - diag
    return _mean_over_kept(rows, keep) + _mean_over_kept(cols, keep)


def distill_kl(student, teacher, temperature, keep=None):
    """KL(teacher || student) of the row softmaxes, batch-mean, plus the same on the transposes.
    ``keep`` as in ``info_nce``."""
    def kl_rows(s, t):
        if keep is None:
            log_p_s = F.log_softmax(s / temperature, dim=1)
            log_p_t = F.log_softmax(t / temperature, dim=1)
            return F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True)
        # Log-probabilities off the kept pairs are set to 0, so they add p * (0 - 0) = 0 (not 0 * inf).
        off = ~_pairs(keep)
        log_p_s = F.log_softmax(_drop_columns(s / temperature, keep), dim=1).masked_fill(off, 0.0)
        log_p_t = F.log_softmax(_drop_columns(t / temperature, keep), dim=1).masked_fill(off, 0.0)
        return _mean_over_kept((log_p_t.exp() * (log_p_t - log_p_s)).sum(1), keep)
    return kl_rows(student, teacher) + kl_rows(student.t(), teacher.t())


def distill_smooth_l1(student, teacher, temperature, keep=None):
    """The TeachText ablation: SmoothL1 between raw similarities (the temperature is unused), mean
    over the kept pairs."""
    if keep is None:
        return F.smooth_l1_loss(student, teacher)
    pairs = _pairs(keep)
    elementwise = F.smooth_l1_loss(student, teacher, reduction="none")
    return torch.where(pairs, elementwise, 0.0).sum() / pairs.sum().clamp(min=1)


# loss.distance -> distillation distance D(student, teacher, temperature, keep).
DISTANCES = {"kl": distill_kl, "smooth_l1": distill_smooth_l1}


# Row masks are applied by weighting, never by boolean indexing: indexing would need the number of
# kept rows on the host (a device synchronisation per step), and a sub-batch with no rows gives a
# 0x0 matrix whose mean is NaN. Weighted, a term over no rows is 0 and its gradients are 0.

def _pairs(keep):
    return keep[:, None] & keep[None, :]


def _drop_columns(logits, keep):
    """-inf in the columns of left-out items, for kept rows only: a kept row's softmax then runs over
    the kept items, as on the sub-matrix; a left-out row stays finite (its value is weighted by 0),
    so neither it nor its gradient is NaN."""
    return logits.masked_fill(keep[:, None] & ~keep[None, :], float("-inf"))


def _mean_over_kept(values, keep):
    return torch.where(keep, values, 0.0).sum() / keep.sum().clamp(min=1)


# ---- teacher poolings: the distillation targets and their weights ------------------------------

class ElementwisePool:
    """One target, the element-wise ``reduce`` of the teachers' matrices, weighted by 1 - λ."""
    learnable = False

    def __init__(self, name, reduce):
        self.name, self.reduce = name, reduce

    def __call__(self, teacher_sims, weight):
        return [(weight, self.reduce(torch.stack(teacher_sims)))]


class PerTeacherPool:
    """One target per teacher, each weighted by 1 - λ; or, where ``learnable``, by its own weight, a
    softmax over logits trained with the student that replaces 1 - λ (the reference's learnable_multitask)."""

    def __init__(self, name, learnable):
        self.name, self.learnable = name, learnable

    def __call__(self, teacher_sims, weight):
        weights = weight if self.learnable else [weight] * len(teacher_sims)
        return list(zip(weights, teacher_sims))


# loss.teacher_pool -> pooling: called with the teachers' [B, B] matrices and the teacher weight
# (1 - λ, or one weight per teacher where the pooling is ``learnable``), it gives the distillation
# targets as [(weight, target matrix)].
TEACHER_POOLS = {pool.name: pool for pool in (
    ElementwisePool("max", lambda stacked: stacked.max(0).values),
    ElementwisePool("min", lambda stacked: stacked.min(0).values),
    ElementwisePool("mean", lambda stacked: stacked.mean(0)),
    PerTeacherPool("multitask", learnable=False), PerTeacherPool("learnable", learnable=True))}

# The reference's --teacher_sim_pool names, mapped to the operation they really computed (docs/reference.md §8.1).
LEGACY_TEACHER_POOLS = {"min": "max", "max": "min", "mean": "mean", "multitask": "multitask",
                        "learnable_multitask": "learnable"}


def legacy_teacher_pool(name):
    """Honest pooling name for a reference ``--teacher_sim_pool`` value, with a warning if it differs."""
    honest = _registered(LEGACY_TEACHER_POOLS, "--teacher_sim_pool", name)
    if honest != name:
        warnings.warn(f"--teacher_sim_pool {name} computed the element-wise {honest} over teachers in the "
                      f"reference; using loss.teacher_pool = '{honest}'", stacklevel=2)
    return honest


# ---- row masks --------------------------------------------------------------------------------------

@dataclass
class RowMasks:
    """The items of the batch each term runs over: [B] bool masks, where None keeps every item and
    takes the plain, unmasked path. A term whose mask keeps no item is 0."""
    captions: dict = field(default_factory=dict)  # language -> the items with a caption in it
    main: torch.Tensor | None = None     # items with an English caption and a non-empty video: the first English term
    teacher: torch.Tensor | None = None  # items with an English caption: those a teacher can score

    @classmethod
    def of(cls, has_caption, has_video):
        """Masks from the batch's ``has_caption`` (language -> [B] bool) and ``has_video`` ([B] bool)."""
        english = has_caption[ENGLISH]
        return cls(dict(has_caption), main=has_video & english, teacher=english)

    def map(self, fn):
        """The masks passed through ``fn`` (captions, then main, then teacher); a None result keeps every row."""
        def apply(mask):
            return None if mask is None else fn(mask)
        captions = {lang: apply(mask) for lang, mask in self.captions.items()}
        return RowMasks({lang: mask for lang, mask in captions.items() if mask is not None},
                        apply(self.main), apply(self.teacher))

    def without_full_masks(self):
        """The masks that leave a row out: in one process the loss then takes its unmasked path where
        it can (under torch.distributed every rank must pass the same masks, for the gather)."""
        return self.map(lambda mask: None if bool(mask.all()) else mask)

    def to(self, device):
        return self.map(lambda mask: mask.to(device, non_blocking=True))

    def gathered(self):
        """The global batch's masks from every rank's, in one collective (every rank holds the same masks)."""
        masks = [m for m in (*self.captions.values(), self.main, self.teacher) if m is not None]
        if not masks:
            return self
        columns = iter(gather(torch.stack(masks, dim=1)).unbind(1))
        return self.map(lambda mask: next(columns))  # map visits the masks in the order they were stacked


# ---- one loss per stage -----------------------------------------------------------------------------

class StageLoss(nn.Module):
    """The training objective of one stage (``name``, the config's ``stage``) over the global batch."""
    name = None
    distils = False  # whether the stage needs teachers' similarities

    def __init__(self, temperature):
        super().__init__()
        self.temperature = temperature

    @classmethod
    def from_config(cls, loss, num_teachers=0):
        """The loss from a config's ``loss`` section."""
        return cls(loss["temperature"])

    @staticmethod
    def student_languages(languages):
        """The caption languages the student trains on, of those of the training file."""
        return languages

    def forward(self, text, video, teacher_sims=None, rows=None):
        """``text``: lang -> [B, P] embeddings (the English one under ``ENGLISH``); ``video``: [B, P];
        ``teacher_sims``: list of [B, B] teacher matrices (stages that distil); ``rows``: RowMasks
        (None keeps every item). Similarities and terms are computed in float32 (float64 inputs
        stay float64), also under autocast. Returns (loss, {term name: detached value}).

        Under torch.distributed the inputs are this rank's slice of the global batch; they are
        gathered (with gradients) so every term sees the whole global batch, and ``teacher_sims``
        must already be global [B_global, B_global] matrices."""
        rows = RowMasks() if rows is None else rows
        if world_size() > 1:  # one collective for all embeddings and one for all row masks
            langs = list(text)
            gathered = gather_with_grad(torch.stack([*(text[lang] for lang in langs), video], dim=1))
            text, video = dict(zip(langs, gathered[:, :-1].unbind(1))), gathered[:, -1]
            rows = rows.gathered()
        sims = {lang: cosine_sim(emb, video) for lang, emb in text.items()}  # float32 (see similarity)
        loss, terms = self.terms(sims, rows.to(video.device), teacher_sims)
        return loss, _detached(terms)

    def main_term(self, sims, rows):
        return info_nce(sims[ENGLISH], self.temperature, rows.main)

    def terms(self, sims, rows, teacher_sims):
        """(loss, {term name: term}) from the student's similarity matrices ``sims`` (lang -> [B, B])."""
        raise NotImplementedError


class ZeroShotLoss(StageLoss):
    """L = NCE(S_en): the student trains on English captions only."""
    name = "zero-shot"

    @staticmethod
    def student_languages(languages):
        return [ENGLISH]

    def terms(self, sims, rows, teacher_sims):
        main = self.main_term(sims, rows)
        return main, {"nce_main": main}


class TranslateTrainLoss(StageLoss):
    """L = NCE(S_en) + sum_{l != en} NCE(S_l), unnormalised, as the reference."""
    name = "translate-train"

    def terms(self, sims, rows, teacher_sims):
        loss = main = self.main_term(sims, rows)
        terms = {"nce_main": main}
        for lang, s in sims.items():
            if lang != ENGLISH:
                terms[f"nce_{lang}"] = info_nce(s, self.temperature, rows.captions.get(lang))
                loss = loss + terms[f"nce_{lang}"]
        return loss, terms


class C2KDLoss(StageLoss):
    """L = λ NCE(S_en) + sum_l [λ NCE(S_l) + sum_t w_t D(S_l, T_t)], English included in the sum."""
    name, distils = "c2kd", True

    def __init__(self, temperature, balance=0.5, distill_temp=0.1, teacher_pool="max", distance="kl",
                 num_teachers=0):
        super().__init__(temperature)
        self.balance, self.distill_temp = balance, distill_temp
        self.pool = _registered(TEACHER_POOLS, "loss.teacher_pool", teacher_pool)
        self.distance = _registered(DISTANCES, "loss.distance", distance)
        if self.pool.learnable:
            # Reference initialisation; trained in its own optimizer group (see trainer). Held by the
            # loss, so that checkpoints keep it under "teacher_logits".
            self.teacher_logits = nn.Parameter(torch.full((num_teachers,), 0.33))

    @classmethod
    def from_config(cls, loss, num_teachers=0):
        return cls(loss["temperature"], loss["balance"], loss["distill_temp"], loss["teacher_pool"],
                   loss["distance"], num_teachers)

    def teacher_weights(self):
        """What the distillation targets are weighted by: 1 - λ, or the learnable per-teacher weights."""
        return torch.softmax(self.teacher_logits, dim=0) if self.pool.learnable else 1.0 - self.balance

    def terms(self, sims, rows, teacher_sims):
        if not teacher_sims:
            raise ValueError("stage 'c2kd' needs teacher similarities")
        lam = self.balance
        main = self.main_term(sims, rows)
        loss, terms = lam * main, {"nce_main": main}
        targets = self.pool([_at_least_float32(t) for t in teacher_sims], self.teacher_weights())
        for lang, s in sims.items():
            nce = info_nce(s, self.temperature, rows.captions.get(lang))
            # Teachers read the English caption: an item without one has no target.
            keep = _both(rows.captions.get(lang), rows.teacher)
            distill = sum(w * self.distance(s, t, self.distill_temp, keep) for w, t in targets)
            terms[f"nce_{lang}"], terms[f"distill_{lang}"] = nce, distill
            loss = loss + lam * nce + distill
        return loss, terms


# stage -> its loss: the one place a stage name is given its meaning.
STAGES = {loss.name: loss for loss in (ZeroShotLoss, TranslateTrainLoss, C2KDLoss)}


def stage_loss(stage):
    """The loss class of ``stage``."""
    return _registered(STAGES, "stage", stage)


def learns_teacher_weights(stage, teacher_pool):
    """Whether the loss of ``stage`` under ``teacher_pool`` trains teacher weights (at teachers.learnable_lr)."""
    return stage_loss(stage).distils and _registered(TEACHER_POOLS, "loss.teacher_pool", teacher_pool).learnable


def _registered(registry, key, name):
    if name not in registry:
        raise ValueError(f"{key} '{name}' is not one of {', '.join(registry)}")
    return registry[name]


def _at_least_float32(x):
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _both(a, b):
    """Intersection of two optional row masks (None keeps every row)."""
    return a if b is None else b if a is None else a & b


def _detached(terms):
    # Kept as tensors: converting to floats here would synchronise the GPU every step.
    return {k: v.detach() for k, v in terms.items()}
