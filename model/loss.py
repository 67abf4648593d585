"""Losses of every training stage: symmetric InfoNCE and the C2KD distillation (c2kd-reference §3).

Notation: S_l is the student's cosine-similarity matrix between the batch's captions in language
l and the batch's videos; T is the teachers' matrix from the English captions of the same items.

- zero-shot:       L = NCE(S_en)
- translate-train: L = NCE(S_en) + sum_{l != en} NCE(S_l)                 (unnormalised, as the reference)
- c2kd:            L = λ NCE(S_en) + sum_l [λ NCE(S_l) + sum_t w_t D(S_l, T_t)]  (English included in the sum)

D is KL(softmax(T/τd) || softmax(S/τd)) over rows plus the same over columns, or the TeachText
SmoothL1 on raw similarities. The teacher pooling decides the targets T_t and their weights w_t.

Each term runs over the items its row mask keeps (0 when it keeps none). Similarities are float32
even under autocast (``similarity``), so every term is too.
"""
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

from data_loader.corpus import ENGLISH
from utils.distributed import gather, gather_with_grad, world_size

STAGES = ("zero-shot", "translate-train", "c2kd")
TEACHER_POOLS = ("max", "min", "mean", "multitask", "learnable")
# The reference's --teacher_sim_pool names, mapped to the operation they really computed (§8.1).
LEGACY_TEACHER_POOLS = {"min": "max", "max": "min", "mean": "mean", "multitask": "multitask",
                        "learnable_multitask": "learnable"}


def legacy_teacher_pool(name):
    """Honest pooling name for a reference ``--teacher_sim_pool`` value, with a warning if it differs."""
    if name not in LEGACY_TEACHER_POOLS:
        raise ValueError(f"--teacher_sim_pool '{name}' is not one of {', '.join(LEGACY_TEACHER_POOLS)}")
    honest = LEGACY_TEACHER_POOLS[name]
    if honest != name:
        warnings.warn(f"--teacher_sim_pool {name} computed the element-wise {honest} over teachers in the "
                      f"reference; using loss.teacher_pool = '{honest}'", stacklevel=2)
    return honest


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


class RetrievalLoss(nn.Module):
    def __init__(self, stage, temperature, balance=0.5, distill_temp=0.1, teacher_pool="max",
                 teachtext=False, num_teachers=0):
        super().__init__()
        if stage not in STAGES:
            raise ValueError(f"stage '{stage}' is not one of {', '.join(STAGES)}")
        if teacher_pool not in TEACHER_POOLS:
            raise ValueError(f"loss.teacher_pool '{teacher_pool}' is not one of {', '.join(TEACHER_POOLS)}")
        self.stage, self.temperature = stage, temperature
        self.balance, self.distill_temp, self.teacher_pool = balance, distill_temp, teacher_pool
        self.distance = distill_smooth_l1 if teachtext else distill_kl
        if stage == "c2kd" and teacher_pool == "learnable":
            # Reference initialisation; trained in its own optimizer group (see trainer).
            self.teacher_logits = nn.Parameter(torch.full((num_teachers,), 0.33))

    def distill_targets(self, teacher_sims):
        """[(weight, target matrix)] for the chosen teacher pooling."""
        stacked = torch.stack(teacher_sims)
        off = 1.0 - self.balance
        if self.teacher_pool == "max":
            return [(off, stacked.max(0).values)]
        if self.teacher_pool == "min":
            return [(off, stacked.min(0).values)]
        if self.teacher_pool == "mean":
            return [(off, stacked.mean(0))]
        if self.teacher_pool == "multitask":
            return [(off, t) for t in teacher_sims]
        # learnable: softmax weights replace (1 - λ), as in the reference's learnable_multitask.
        weights = torch.softmax(self.teacher_logits, dim=0)
        return [(weights[i], t) for i, t in enumerate(teacher_sims)]

    def forward(self, text, video, teacher_sims=None, rows=None):
        """``text``: lang -> [B, P] embeddings (the English one under ``ENGLISH``);
        ``video``: [B, P]; ``teacher_sims``: list of [B, B] teacher matrices (c2kd only);
        ``rows``: lang -> [B] bool, the items that have a caption in that language; "main": those
        with an English caption and a non-empty video (the first English term); "teacher": those
        with an English caption (the ones a teacher can score). A missing key keeps every item; a term
        whose mask keeps no item is 0. Similarities and terms are computed in float32 (float64 inputs
        stay float64), also under autocast. Returns (loss, {term name: detached value}).

        Under torch.distributed the inputs are this rank's slice of the global batch; they are
        gathered (with gradients) so every term sees the whole global batch, and ``teacher_sims``
        must already be global [B_global, B_global] matrices."""
        if world_size() > 1:  # one collective for all embeddings and one for all row masks
            langs = list(text)
            gathered = gather_with_grad(torch.stack([*(text[lang] for lang in langs), video], dim=1))
            text, video = dict(zip(langs, gathered[:, :-1].unbind(1))), gathered[:, -1]
            if rows is not None:
                keys = list(rows)
                rows = dict(zip(keys, gather(torch.stack([rows[k] for k in keys], dim=1)).unbind(1)))
        terms = {}
        sims = {lang: cosine_sim(emb, video) for lang, emb in text.items()}  # float32 (see similarity)
        if teacher_sims:
            teacher_sims = [_at_least_float32(t) for t in teacher_sims]

        # A missing mask keeps every row and takes the unmasked path; a mask that keeps no row in
        # this batch (e.g. a RUDDER batch without some language) gives a term of 0, not NaN.
        rows = {k: v.to(video.device, non_blocking=True) for k, v in (rows or {}).items()}

        main = info_nce(sims[ENGLISH], self.temperature, rows.get("main"))
        terms["nce_main"] = main
        if self.stage == "zero-shot":
            return main, _detached(terms)
        if self.stage == "translate-train":
            loss = main
            for lang, s in sims.items():
                if lang != ENGLISH:
                    terms[f"nce_{lang}"] = info_nce(s, self.temperature, rows.get(lang))
                    loss = loss + terms[f"nce_{lang}"]
            return loss, _detached(terms)

        if not teacher_sims:
            raise ValueError("stage 'c2kd' needs teacher similarities")
        lam = self.balance
        loss = lam * main
        targets = self.distill_targets(teacher_sims)
        for lang, s in sims.items():
            nce = info_nce(s, self.temperature, rows.get(lang))
            # Teachers read the English caption: an item without one has no target.
            keep = _both(rows.get(lang), rows.get("teacher"))
            distill = sum(w * self.distance(s, t, self.distill_temp, keep) for w, t in targets)
            terms[f"nce_{lang}"], terms[f"distill_{lang}"] = nce, distill
            loss = loss + lam * nce + distill
        return loss, _detached(terms)


def _at_least_float32(x):
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _both(a, b):
    """Intersection of two optional row masks (None keeps every row)."""
    return a if b is None else b if a is None else a & b


def _detached(terms):
    # Kept as tensors: converting to floats here would synchronise the GPU every step.
    return {k: v.detach() for k, v in terms.items()}
