"""Losses against values worked out by hand on 2x2 matrices."""
import math
import warnings

import pytest
import torch

from model.loss import (DISTANCES, STAGES, TEACHER_POOLS, C2KDLoss, RowMasks, TranslateTrainLoss, ZeroShotLoss,
                        cosine_sim, distill_kl, info_nce, legacy_teacher_pool, stage_loss)
from parse_config import resolve
from trainer.build import build_loss

# Text embeddings whose cosine similarities with the identity "videos" are exactly their entries:
# row 0 = (1, 0), row 1 = (0.6, 0.8), both unit vectors.
TEXT = torch.tensor([[1.0, 0.0], [0.6, 0.8]], dtype=torch.float64)
VIDEO = torch.eye(2, dtype=torch.float64)
S = [[1.0, 0.0], [0.6, 0.8]]


def ce(logits, target):
    """-log softmax(logits)[target], written out."""
    return -logits[target] + math.log(sum(math.exp(x) for x in logits))


def nce_by_hand(s, tau):
    rows = (ce([s[0][0] / tau, s[0][1] / tau], 0) + ce([s[1][0] / tau, s[1][1] / tau], 1)) / 2
    cols = (ce([s[0][0] / tau, s[1][0] / tau], 0) + ce([s[0][1] / tau, s[1][1] / tau], 1)) / 2
    return rows + cols


def kl_by_hand(s, t, tau):
    """KL(softmax(t/tau) || softmax(s/tau)) summed over the 2 rows, divided by 2, plus columns."""
    def row_kl(srow, trow):
        zs = sum(math.exp(x / tau) for x in srow)
        zt = sum(math.exp(x / tau) for x in trow)
        return sum(math.exp(b / tau) / zt * ((b / tau - math.log(zt)) - (a / tau - math.log(zs)))
                   for a, b in zip(srow, trow))
    cols = lambda m: [[m[0][0], m[1][0]], [m[0][1], m[1][1]]]  # noqa: E731
    return (row_kl(s[0], t[0]) + row_kl(s[1], t[1])) / 2 + \
        (row_kl(cols(s)[0], cols(t)[0]) + row_kl(cols(s)[1], cols(t)[1])) / 2


def test_cosine_sim_of_fixture_is_its_entries():
    assert torch.allclose(cosine_sim(TEXT, VIDEO), torch.tensor(S, dtype=torch.float64))


def test_info_nce_simple_case():
    # S = I, tau = 1: every row and column has -log(e / (e + 1)) = log(1 + 1/e); rows + columns.
    expected = 2 * math.log(1 + math.exp(-1))
    assert info_nce(torch.eye(2), 1.0).item() == pytest.approx(expected, rel=1e-6)


def test_info_nce_asymmetric_matrix():
    # logits S / 0.5 = [[2, 0], [1.2, 1.6]]
    # rows:    log(1 + e^-2) and log(1 + e^(1.2 - 1.6)); columns: log(1 + e^(1.2 - 2)) and log(1 + e^(0 - 1.6))
    expected = (math.log(1 + math.exp(-2)) + math.log(1 + math.exp(-0.4))) / 2 \
        + (math.log(1 + math.exp(-0.8)) + math.log(1 + math.exp(-1.6))) / 2
    assert info_nce(torch.tensor(S), 0.5).item() == pytest.approx(expected, rel=1e-6)
    assert nce_by_hand(S, 0.5) == pytest.approx(expected, rel=1e-12)


def test_distill_kl_matches_hand_computation_and_vanishes_on_equal_inputs():
    t = [[0.9, 0.2], [0.1, 0.7]]
    got = distill_kl(torch.tensor(S, dtype=torch.float64), torch.tensor(t, dtype=torch.float64), 0.1).item()
    assert got == pytest.approx(kl_by_hand(S, t, 0.1), rel=1e-9)
    assert distill_kl(torch.tensor(t), torch.tensor(t), 0.1).item() == pytest.approx(0.0, abs=1e-7)


def test_zero_shot_uses_english_only():
    loss = ZeroShotLoss(temperature=0.5)
    value, terms = loss({"en": TEXT, "de": TEXT.flip(0)}, VIDEO)
    assert value.item() == pytest.approx(nce_by_hand(S, 0.5), rel=1e-9)
    assert set(terms) == {"nce_main"}


def test_translate_train_sums_languages_without_normalising():
    swapped = TEXT.flip(1)  # rows (0, 1) and (0.8, 0.6): sims [[0, 1], [0.8, 0.6]]
    s_de = [[0.0, 1.0], [0.8, 0.6]]
    loss = TranslateTrainLoss(temperature=0.5)
    value, terms = loss({"en": TEXT, "de": swapped, "fr": TEXT}, VIDEO)
    expected = nce_by_hand(S, 0.5) + nce_by_hand(s_de, 0.5) + nce_by_hand(S, 0.5)
    assert value.item() == pytest.approx(expected, rel=1e-9)
    assert set(terms) == {"nce_main", "nce_de", "nce_fr"}


def test_rows_mask_leaves_items_out_of_a_language():
    loss = TranslateTrainLoss(temperature=0.5)
    three_text = torch.cat([TEXT, torch.tensor([[0.0, 1.0]], dtype=torch.float64)])
    three_video = torch.cat([VIDEO, torch.tensor([[0.6, 0.8]], dtype=torch.float64)])
    rows = RowMasks({"de": torch.tensor([True, True, False])}, main=torch.tensor([True, True, False]))
    value, _ = loss({"en": three_text, "de": three_text}, three_video, rows=rows)
    # Only the first two items remain: the 2x2 block of the 3x3 matrix, which is S.
    assert value.item() == pytest.approx(2 * nce_by_hand(S, 0.5), rel=1e-9)


T1 = [[0.9, 0.2], [0.1, 0.7]]
T2 = [[0.5, 0.6], [0.3, 0.4]]
ELEMENTWISE = {
    "max": [[max(a, b) for a, b in zip(r1, r2)] for r1, r2 in zip(T1, T2)],
    "min": [[min(a, b) for a, b in zip(r1, r2)] for r1, r2 in zip(T1, T2)],
    "mean": [[(a + b) / 2 for a, b in zip(r1, r2)] for r1, r2 in zip(T1, T2)],
}


def c2kd_value(pool, lam=0.3, tau=0.5, tau_d=0.2):
    loss = C2KDLoss(temperature=tau, balance=lam, distill_temp=tau_d, teacher_pool=pool, num_teachers=2).double()
    teachers = [torch.tensor(T1, dtype=torch.float64), torch.tensor(T2, dtype=torch.float64)]
    value, terms = loss({"en": TEXT, "de": TEXT}, VIDEO, teacher_sims=teachers)
    return value.item(), terms


@pytest.mark.parametrize("pool", ["max", "min", "mean"])
def test_c2kd_elementwise_pools(pool):
    lam, tau, tau_d = 0.3, 0.5, 0.2
    nce = nce_by_hand(S, tau)
    kl = kl_by_hand(S, ELEMENTWISE[pool], tau_d)
    # λ NCE(en) + for en and de: λ NCE + (1 - λ) KL
    expected = lam * nce + 2 * (lam * nce + (1 - lam) * kl)
    assert c2kd_value(pool)[0] == pytest.approx(expected, rel=1e-9)


def test_c2kd_multitask_sums_one_term_per_teacher():
    lam, tau, tau_d = 0.3, 0.5, 0.2
    nce = nce_by_hand(S, tau)
    kl = (1 - lam) * (kl_by_hand(S, T1, tau_d) + kl_by_hand(S, T2, tau_d))
    assert c2kd_value("multitask")[0] == pytest.approx(lam * nce + 2 * (lam * nce + kl), rel=1e-9)


def test_c2kd_learnable_weights_start_equal_and_get_gradients():
    lam, tau, tau_d = 0.3, 0.5, 0.2
    nce = nce_by_hand(S, tau)
    # Equal initial logits: softmax weights 1/2 each, replacing (1 - λ) as in the reference.
    kl = 0.5 * kl_by_hand(S, T1, tau_d) + 0.5 * kl_by_hand(S, T2, tau_d)
    assert c2kd_value("learnable")[0] == pytest.approx(lam * nce + 2 * (lam * nce + kl), rel=1e-9)
    loss = C2KDLoss(0.5, balance=lam, distill_temp=tau_d, teacher_pool="learnable", num_teachers=2)
    value, _ = loss({"en": TEXT.float()}, VIDEO.float(), teacher_sims=[torch.tensor(T1), torch.tensor(T2)])
    value.backward()
    assert loss.teacher_logits.grad is not None and loss.teacher_logits.grad.abs().sum() > 0


def test_c2kd_with_balance_one_keeps_only_contrastive_terms():
    value, terms = c2kd_value("max", lam=1.0)
    assert value == pytest.approx(3 * nce_by_hand(S, 0.5), rel=1e-9)
    assert all(v.item() == 0 for k, v in terms.items() if k.startswith("distill"))


def test_c2kd_smooth_l1_distance_is_on_raw_similarities():
    lam = 0.3
    loss = C2KDLoss(0.5, balance=lam, distill_temp=0.2, teacher_pool="max", distance="smooth_l1", num_teachers=1)
    value, _ = loss({"en": TEXT}, VIDEO, teacher_sims=[torch.tensor(T1, dtype=torch.float64)])
    # SmoothL1 (beta 1) of |S - T1| = (0.1, 0.2, 0.5, 0.1): all < 1, so 0.5 d^2, averaged over 4 entries.
    smooth = sum(0.5 * d * d for d in (0.1, 0.2, 0.5, 0.1)) / 4
    nce = nce_by_hand(S, 0.5)
    assert value.item() == pytest.approx(lam * nce + lam * nce + (1 - lam) * smooth, rel=1e-9)


def test_legacy_pool_names_map_to_the_operation_they_computed():
    with pytest.warns(UserWarning, match="element-wise max"):
        assert legacy_teacher_pool("min") == "max"
    with pytest.warns(UserWarning, match="element-wise min"):
        assert legacy_teacher_pool("max") == "min"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert legacy_teacher_pool("mean") == "mean"
    with pytest.raises(ValueError, match="teacher_sim_pool"):
        legacy_teacher_pool("median")


def test_unknown_stage_pool_and_distance_are_rejected():
    with pytest.raises(ValueError, match="stage 'c3kd' is not one of zero-shot, translate-train, c2kd"):
        stage_loss("c3kd")
    with pytest.raises(ValueError, match="loss.teacher_pool 'median' is not one of"):
        C2KDLoss(0.05, teacher_pool="median")
    with pytest.raises(ValueError, match="loss.distance 'l2' is not one of kl, smooth_l1"):
        C2KDLoss(0.05, distance="l2")


def test_items_without_english_get_no_distillation_target():
    lam, tau, tau_d = 0.3, 0.5, 0.2
    three_text = torch.cat([TEXT, torch.tensor([[0.0, 1.0]], dtype=torch.float64)])
    three_video = torch.cat([VIDEO, torch.tensor([[0.6, 0.8]], dtype=torch.float64)])
    garbage = torch.full((3, 3), 5.0, dtype=torch.float64)
    garbage[:2, :2] = torch.tensor(T1, dtype=torch.float64)
    has_en = torch.tensor([True, True, False])
    rows = RowMasks({"en": has_en, "hi": torch.ones(3, dtype=torch.bool)}, main=has_en, teacher=has_en)
    loss = C2KDLoss(tau, balance=lam, distill_temp=tau_d, teacher_pool="max", num_teachers=1).double()
    value, terms = loss({"en": three_text, "hi": three_text}, three_video, teacher_sims=[garbage], rows=rows)
    # The third item (no English caption) is in Hindi's contrastive term but in no distillation term.
    expected_distill = (1 - lam) * kl_by_hand(S, T1, tau_d)
    assert terms["distill_hi"].item() == pytest.approx(expected_distill, rel=1e-9)
    assert terms["distill_en"].item() == pytest.approx(expected_distill, rel=1e-9)
    assert terms["nce_en"].item() == pytest.approx(nce_by_hand(S, tau), rel=1e-9)


# ---- row masks: a term over no rows is 0, and the weighted form equals sub-matrix indexing ----

from model.loss import distill_smooth_l1  # noqa: E402


def _indexed(fn, keep, *matrices, **kw):
    """The term computed on the sub-matrix of the kept rows and columns."""
    return fn(*(m[keep][:, keep] for m in matrices), **kw)


@pytest.mark.parametrize("seed", range(6))
def test_masked_terms_equal_sub_matrix_indexing(seed):
    gen = torch.Generator().manual_seed(seed)
    b = 9
    s = torch.rand(b, b, generator=gen) * 2 - 1
    t = torch.rand(b, b, generator=gen) * 2 - 1
    keep = torch.rand(b, generator=gen) < 0.6
    keep[seed % b] = True  # at least one row; the empty case is tested below
    for fn, args, kw in [(info_nce, (s,), {"temperature": 0.05}),
                         (distill_kl, (s, t), {"temperature": 0.1}),
                         (distill_smooth_l1, (s, t), {"temperature": 0.1})]:
        masked = fn(*args, **kw, keep=keep)
        assert masked.item() == pytest.approx(_indexed(fn, keep, *args, **kw).item(), rel=1e-6, abs=1e-6)
        # A mask that keeps every row gives the unmasked value.
        assert fn(*args, **kw, keep=torch.ones(b, dtype=torch.bool)).item() == \
            pytest.approx(fn(*args, **kw).item(), rel=1e-6, abs=1e-6)


@pytest.mark.parametrize("fn, n_args", [(info_nce, 1), (distill_kl, 2), (distill_smooth_l1, 2)])
def test_masked_terms_over_no_rows_are_zero_with_finite_gradients(fn, n_args):
    s = torch.randn(5, 5, requires_grad=True)
    t = torch.randn(5, 5)
    value = fn(*(s, t)[:n_args], 0.1, keep=torch.zeros(5, dtype=torch.bool))
    assert value.item() == 0.0
    value.backward()
    assert torch.isfinite(s.grad).all() and (s.grad == 0).all()


def test_masked_terms_give_finite_gradients_only_to_kept_pairs():
    s = torch.randn(6, 6, requires_grad=True)
    keep = torch.tensor([True, False, True, True, False, False])
    (info_nce(s, 0.05, keep=keep) + distill_kl(s, torch.randn(6, 6), 0.1, keep=keep)).backward()
    assert torch.isfinite(s.grad).all()
    pair = keep[:, None] & keep[None, :]
    assert (s.grad[~pair] == 0).all() and (s.grad[pair] != 0).any()


def test_a_single_kept_row_gives_zero_contrastive_and_distillation_terms():
    keep = torch.tensor([False, True, False])
    s, t = torch.randn(3, 3), torch.randn(3, 3)
    assert info_nce(s, 0.05, keep=keep).item() == 0.0  # InfoNCE of a 1x1 matrix
    assert distill_kl(s, t, 0.1, keep=keep).item() == pytest.approx(0.0, abs=1e-7)


LOSS = {"temperature": 0.05, "balance": 0.5, "distill_temp": 0.1, "teacher_pool": "max", "distance": "kl"}


@pytest.mark.parametrize("stage", ["translate-train", "c2kd"])
def test_a_language_with_no_rows_in_the_batch_adds_zero_not_nan(stage):
    # RUDDER-like batch: no item has a German caption, and no item has an English one.
    text = {"en": torch.randn(4, 8, requires_grad=True), "de": torch.randn(4, 8, requires_grad=True)}
    video = torch.randn(4, 8, requires_grad=True)
    none, every = torch.zeros(4, dtype=torch.bool), torch.ones(4, dtype=torch.bool)
    rows = RowMasks({"de": none, "en": every}, main=none, teacher=none)
    loss = stage_loss(stage).from_config(LOSS, num_teachers=1)
    teachers = [torch.rand(4, 4)] if stage == "c2kd" else None
    value, terms = loss(text, video, teacher_sims=teachers, rows=rows)
    assert torch.isfinite(value)
    assert terms["nce_main"].item() == 0.0 and terms["nce_de"].item() == 0.0
    if stage == "c2kd":
        assert terms["distill_en"].item() == 0.0 and terms["distill_de"].item() == 0.0
        # Only English's contrastive term over all four items remains.
        assert value.item() == pytest.approx(0.5 * info_nce(cosine_sim(text["en"], video), 0.05).item(), rel=1e-6)
    value.backward()
    assert all(torch.isfinite(x.grad).all() for x in (text["en"], text["de"], video))
    assert (text["de"].grad == 0).all()


# ---- precision: similarities and loss terms are float32 under autocast --------------------------

@pytest.mark.parametrize("stage, pool", [("translate-train", "max"), ("c2kd", "max"), ("c2kd", "learnable")])
def test_loss_under_bf16_autocast_equals_the_float32_loss(stage, pool):
    gen = torch.Generator().manual_seed(0)
    text = {lang: torch.randn(16, 32, generator=gen) for lang in ("en", "de")}
    video = torch.randn(16, 32, generator=gen)
    teachers = [torch.rand(16, 16, generator=gen) * 2 - 1 for _ in range(2)] if stage == "c2kd" else None
    rows = RowMasks({"de": torch.rand(16, generator=gen) < 0.7})
    loss = stage_loss(stage).from_config({**LOSS, "teacher_pool": pool}, num_teachers=2)
    plain, plain_terms = loss(text, video, teacher_sims=teachers, rows=rows)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto, auto_terms = loss(text, video, teacher_sims=teachers, rows=rows)
    assert auto.dtype == torch.float32 and all(v.dtype == torch.float32 for v in auto_terms.values())
    assert auto.item() == pytest.approx(plain.item(), rel=1e-6)
    for name, value in plain_terms.items():
        assert auto_terms[name].item() == pytest.approx(value.item(), rel=1e-6, abs=1e-7)


def test_half_precision_embeddings_are_scored_in_float32():
    gen = torch.Generator().manual_seed(1)
    text = {"en": torch.randn(8, 16, generator=gen).bfloat16()}
    video = torch.randn(8, 16, generator=gen).bfloat16()
    loss = TranslateTrainLoss(0.05)
    value, terms = loss(text, video)
    assert value.dtype == torch.float32
    expected = info_nce(cosine_sim(text["en"].float(), video.float()), 0.05)
    assert value.item() == pytest.approx(expected.item(), rel=1e-6)


# ---- registries: every stage, pooling and distance is a config choice and builds -------------------

# Pooling and distance matter only to a stage that distils: every pair there, the defaults elsewhere.
REGISTRY_CASES = [(stage, pool, distance) for stage, cls in STAGES.items() if cls.distils
                  for pool in TEACHER_POOLS for distance in DISTANCES] + \
                 [(stage, "max", "kl") for stage, cls in STAGES.items() if not cls.distils]


@pytest.mark.parametrize("stage, pool, distance", REGISTRY_CASES)
def test_every_registered_stage_pool_and_distance_is_accepted_by_the_config_and_builds(stage, pool, distance):
    config = resolve({"stage": stage, "loss.teacher_pool": pool, "loss.distance": distance})
    loss = build_loss(config, num_teachers=2)
    if loss.distils:
        assert loss.pool is TEACHER_POOLS[pool] and loss.distance is DISTANCES[distance]
    value, terms = loss({"en": TEXT.float(), "de": TEXT.flip(1).float()}, VIDEO.float(),
                        teacher_sims=[torch.tensor(T1), torch.tensor(T2)])
    assert torch.isfinite(value) and "nce_main" in terms


@pytest.mark.parametrize("key, value", [("stage", "c3kd"), ("loss.teacher_pool", "median"), ("loss.distance", "l2")])
def test_a_name_outside_its_registry_is_refused_by_the_config(key, value):
    from parse_config import ConfigError
    with pytest.raises(ConfigError, match=f"config key '{key}' = \"{value}\" is not one of"):
        resolve({key: value})


def test_zero_shot_students_read_english_only():
    languages = ["de", "en", "fr"]
    assert ZeroShotLoss.student_languages(languages) == ["en"]
    assert TranslateTrainLoss.student_languages(languages) == C2KDLoss.student_languages(languages) == languages
    assert [name for name, loss in STAGES.items() if loss.distils] == ["c2kd"]


def test_row_masks_of_a_batch_and_the_masks_that_leave_rows_out():
    has_caption = {"en": torch.tensor([True, True, False, True]), "de": torch.ones(4, dtype=torch.bool)}
    rows = RowMasks.of(has_caption, has_video=torch.tensor([True, False, True, True]))
    assert rows.main.tolist() == [True, False, False, True]  # English caption and a non-empty video
    assert rows.teacher.tolist() == [True, True, False, True]  # English caption
    kept = rows.without_full_masks()
    assert list(kept.captions) == ["en"] and kept.main is rows.main and kept.teacher is rows.teacher
    full = RowMasks.of({"en": torch.ones(4, dtype=torch.bool)}, has_video=torch.ones(4, dtype=torch.bool))
    empty = full.without_full_masks()
    assert (empty.captions, empty.main, empty.teacher) == ({}, None, None)
