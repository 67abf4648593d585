"""Conversion of the authors' released checkpoints (utils/convert_checkpoint.py).

A checkpoint in the reference's layout (docs/reference.md §2.6, §5) is built here with tiny local text
encoders and random weights, dead modules included. The converted model must give the embeddings
that the reference's math (docs/reference.md §2.2-2.4), written out below with plain torch ops, gives on the same
reference weights.
"""
import argparse
import importlib.util
import json
import math
import os
import pathlib
import pickle
import subprocess
import sys
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModel, AutoTokenizer

import parse_config
from data_loader.batch import Tokens
from model.model import DEFAULT_BUCKET_ROWS, model_from_checkpoint
from utils import tiny_encoders
from common.checkpoint import load_checkpoint
from utils.convert_checkpoint import ConvertError, convert, main

ROOT = Path(__file__).resolve().parents[1]
# The recipe converted checkpoints take their data settings from (MSR-VTT: teachers read cleaned English).
DATA_CONFIG = ROOT / "configs" / "msrvtt" / "base.json"
FEATURE_DIM, WIDTH, PROJ, MLP, DEPTH, HEADS = 24, 32, 16, 64, 2, 4
ARCH = {"labse": "BaselineTokenFusionPerModModelLaBSE", "mbert": "BaselineTokenFusionPerModModelMBert",
        "xlm": "BaselineTokenFusionPerModModelXLMbase", "distill": "BaselineTokenFusionPerModModelDistill"}
ENCODER = {"labse": "labse-tiny", "mbert": "mbert-tiny", "xlm": "xlmr-tiny", "distill": "distiluse-tiny"}
CAPTIONS = ["a man cuts an onion in the kitchen", "ein Mann schneidet eine Zwiebel",
            "une femme lave une tasse", "a dog runs in the park then jumps", "一个人在厨房里切洋葱",
            "người đàn ông mở hộp", "мужчина открывает коробку", "mtu anafungua sanduku"]


@pytest.fixture(scope="session")
def encoders(tmp_path_factory):
    return tiny_encoders.build(tmp_path_factory.mktemp("encoders"), CAPTIONS * 4)


# ---- a checkpoint in the reference layout --------------------------------------------------------

class ConfigParser:
    """Pickled as parse_config.ConfigParser, with the kinds of attributes the reference's has."""

    def __init__(self):
        self.config = OrderedDict(name="23_msrvtt_xlm", arch=OrderedDict(type="X", args={}))
        self.args = argparse.Namespace(config="configs/x.yaml", resume=None, device=None)
        self.cfg_fname = pathlib.Path("configs/x.yaml")
        self._save_dir = pathlib.Path("exps/models/x/0101_000000")
        self.log_levels = {0: 30, 1: 20, 2: 10}


def reference_state(encoder_dir, seed=0):
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        return torch.randn(*shape, generator=g) * scale

    def linear(prefix, i, o):
        return {f"{prefix}.weight": rand(o, i, scale=1 / math.sqrt(i)), f"{prefix}.bias": rand(o, scale=0.1)}

    def norm(prefix, n):
        return {f"{prefix}.weight": 1 + rand(n, scale=0.2), f"{prefix}.bias": rand(n, scale=0.1)}

    def gated(prefix, i, o):
        return {**linear(f"{prefix}.fc", i, o), **linear(f"{prefix}.cg.fc", o, o)}

    encoder = AutoModel.from_pretrained(encoder_dir)
    hidden = encoder.config.hidden_size
    sd = {**norm("video_norm_layer", WIDTH), **norm("text_norm_layer", WIDTH), **norm("audio_norm_layer", WIDTH)}
    sd.update({"davenet.conv1.weight": rand(128, 1, 40, 1), "davenet.bn1.running_mean": rand(128),
               "davenet.bn1.num_batches_tracked": torch.tensor(0),
               "davenet.layer1.0.downsample.0.weight": rand(128, 128, 1, 1)})
    sd.update({**gated("video_token_proj", FEATURE_DIM, WIDTH), **gated("text_token_proj", 300, WIDTH),
               **gated("audio_token_proj", 4096, WIDTH), **gated("video_proj", WIDTH, PROJ)})
    sd.update({**norm("text_proj.0", hidden), **gated("text_proj.1", hidden, PROJ), **gated("audio_proj", WIDTH, PROJ)})
    text = {f"fusion_text.{k}": v + rand(*v.shape, scale=0.02) for k, v in encoder.state_dict().items()}
    text["fusion_text.embeddings.position_ids"] = torch.arange(encoder.config.max_position_embeddings)[None]
    t2t = {**norm("text_proj_t2t.0", hidden), **gated("text_proj_t2t.1", hidden, PROJ)}
    fusion = {"cls_token": rand(1, 1, WIDTH), "masking_token": rand(WIDTH), **norm("norm", WIDTH)}
    for i in range(DEPTH):
        fusion.update({**norm(f"blocks.{i}.norm1", WIDTH), **linear(f"blocks.{i}.attn.qkv", WIDTH, 3 * WIDTH),
                       **linear(f"blocks.{i}.attn.proj", WIDTH, WIDTH), **norm(f"blocks.{i}.norm2", WIDTH),
                       **linear(f"blocks.{i}.mlp.fc1", WIDTH, MLP), **linear(f"blocks.{i}.mlp.fc2", MLP, WIDTH)})
    fusion_keys = {f"fusion_video.{k}": v for k, v in fusion.items()} | {f"fusion.{k}": v for k, v in fusion.items()}
    sd.update(text | t2t | fusion_keys if encoder_dir.name == "labse-tiny" else t2t | fusion_keys | text)
    sd["learnable_weights"] = torch.full((3,), 0.33)
    return OrderedDict(sd)


def save_reference(path, state, arch=None, prefix=""):
    """torch.save as the reference did: a dict whose config is a pickled parse_config.ConfigParser
    (or a bare state dict when arch is None)."""
    state = OrderedDict((prefix + k, v) for k, v in state.items())
    obj = state if arch is None else {"arch": arch, "epoch": 20, "step": 1234, "state_dict": state,
                                      "optimizer": {"state": {}, "param_groups": [{"lr": 1e-4, "betas": (0.9, 0.999)}]},
                                      "monitor_best": 0, "config": ConfigParser()}
    ConfigParser.__module__, ConfigParser.__qualname__ = "parse_config", "ConfigParser"
    with pytest.MonkeyPatch.context() as mp:  # pickle checks that parse_config.ConfigParser is this class
        mp.setattr(parse_config, "ConfigParser", ConfigParser, raising=False)
        torch.save(obj, path)
    return path


# ---- the reference's math, from docs/reference.md §2.2-2.4 ------------------------------------------

def ref_gated(sd, prefix, x):
    h = F.linear(x, sd[f"{prefix}.fc.weight"], sd[f"{prefix}.fc.bias"])
    return h * torch.sigmoid(F.linear(h, sd[f"{prefix}.cg.fc.weight"], sd[f"{prefix}.cg.fc.bias"]))


# Every LayerNorm of the reference model has eps 1e-6 (docs/reference.md §2.1).
REFERENCE_EPS = 1e-6


def ref_layer_norm(x, weight, bias, eps=REFERENCE_EPS):
    """LayerNorm written out: biased variance over the last dimension, then scale and shift."""
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * weight + bias


def ref_video(sd, video, mask, video_eps=REFERENCE_EPS):
    b = video.shape[0]
    x = ref_layer_norm(ref_gated(sd, "video_token_proj", video), sd["video_norm_layer.weight"],
                       sd["video_norm_layer.bias"], eps=video_eps)
    mask = mask.clone().to(x.dtype)
    empty = mask.sum(1) == 0
    x[empty, 0] = sd["fusion_video.masking_token"]
    mask[empty, 0] = 1
    x = torch.cat([sd["fusion_video.cls_token"].expand(b, 1, WIDTH), x], 1)
    mask = torch.cat([torch.ones(b, 1, dtype=x.dtype), mask], 1)
    n, d = x.shape[1], WIDTH // HEADS
    for i in range(DEPTH):
        def p(name):  # (weight, bias) of a layer of block i
            return sd[f"fusion_video.blocks.{i}.{name}.weight"], sd[f"fusion_video.blocks.{i}.{name}.bias"]
        h = ref_layer_norm(x, *p("norm1"))
        q, k, v = F.linear(h, *p("attn.qkv")).reshape(b, n, 3, HEADS, d).permute(2, 0, 3, 1, 4)
        scores = (q @ k.transpose(-2, -1)) * d ** -0.5
        attn = scores.masked_fill(mask[:, None, None, :] == 0, float("-inf")).softmax(-1)
        x = x + F.linear((attn @ v).transpose(1, 2).reshape(b, n, WIDTH), *p("attn.proj"))
        h = ref_layer_norm(x, *p("norm2"))
        x = x + F.linear(F.gelu(F.linear(h, *p("mlp.fc1"))), *p("mlp.fc2"))
    return ref_gated(sd, "video_proj", x[:, 0])


def ref_text(sd, encoder_dir, tokens, pool_mask, text_eps=REFERENCE_EPS):
    dtype = sd["text_proj.0.weight"].dtype
    encoder = AutoModel.from_config(AutoConfig.from_pretrained(encoder_dir)).eval().to(dtype)
    encoder.load_state_dict({k.removeprefix("fusion_text."): v for k, v in sd.items()
                             if k.startswith("fusion_text.") and not k.endswith("position_ids")})
    states = encoder(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask).last_hidden_state
    m = pool_mask.unsqueeze(-1).to(dtype)
    pooled = (states * m).sum(1) / m.sum(1)
    pooled = ref_layer_norm(pooled, sd["text_proj.0.weight"], sd["text_proj.0.bias"], eps=text_eps)
    return ref_gated(sd, "text_proj.1", pooled)


def tokens(encoder_dir, texts=CAPTIONS[:4], length=40):
    tok = AutoTokenizer.from_pretrained(encoder_dir)
    out = tok(list(texts), padding="max_length", max_length=length, truncation=True, return_tensors="pt")
    return Tokens(out["input_ids"], out["attention_mask"])


def videos():
    g = torch.Generator().manual_seed(1)
    video = torch.randn(4, 6, FEATURE_DIM, generator=g)
    mask = torch.tensor([[1] * 6, [1] * 3 + [0] * 3, [1] + [0] * 5, [0] * 6])  # the last video is empty
    return video * mask[..., None], mask


def load_converted(path):
    """As test.py, trainer/teachers.py and the inference API do."""
    state = load_checkpoint(path)
    model, _ = model_from_checkpoint(state["config"], state, path)
    return model.eval(), state


# ---- tests ----------------------------------------------------------------------------------------

# (name, how it was saved): the wrapped file of the reference trainer, DataParallel prefixes, a bare state dict
CASES = [("labse", "wrapped"), ("mbert", "wrapped"), ("xlm", "bare"), ("distill", "module.")]


@pytest.mark.parametrize("kind,saved", CASES)
def test_converted_model_matches_reference_math(kind, saved, encoders, tmp_path):
    encoder_dir = encoders[ENCODER[kind]]
    sd = reference_state(encoder_dir, seed=len(kind))
    src = save_reference(tmp_path / "latest_model.pth", sd, arch=None if saved == "bare" else ARCH[kind],
                         prefix="module." if saved == "module." else "")
    summary = convert(src, tmp_path / f"msrvtt_{kind}.pt", encoder_dir, DATA_CONFIG)
    assert summary["unknown"] == [] and sum(summary["dropped"].values()) > 0
    model, state = load_converted(tmp_path / f"msrvtt_{kind}.pt")

    cfg = state["config"]
    assert cfg["model"] | {"text_encoder": None} == {
        "text_encoder": None, "width": WIDTH, "projection_dim": PROJ, "depth": DEPTH, "heads": HEADS,
        "mlp_ratio": MLP / WIDTH, "role": "student" if kind == "labse" else "teacher",
        "pool_with_student_mask": kind != "labse",
        "pool_mask_tokenizer": "sentence-transformers/LaBSE", "length_bucket_rows": DEFAULT_BUCKET_ROWS}
    assert (cfg["name"], cfg["stage"], cfg["data"]["feature_dim"], cfg["data"]["feature_key"]) == \
        (f"msrvtt_{kind}", "translate-train", FEATURE_DIM, "2d")
    # The data recipe comes from the dataset config: MSR-VTT's teachers read cleaned English.
    assert (cfg["data"]["clean_english"], cfg["data"]["layout"], cfg["eval"]["total_queries"]) == (True, "multi-msrvtt", 1000)
    assert state["epoch"] == (0 if saved == "bare" else 20) and state["converted_from"] == str(src)

    with torch.no_grad():
        video, mask = videos()
        torch.testing.assert_close(model.encode_video(video, mask), ref_video(sd, video, mask), atol=1e-5, rtol=0)
        tok = tokens(encoder_dir)
        torch.testing.assert_close(model.encode_text(tok), ref_text(sd, encoder_dir, tok, tok.attention_mask),
                                   atol=1e-5, rtol=0)


def small_variance(sd, scale=1e-3):
    """``sd`` with the inputs of the video and text LayerNorms shrunk to a variance of the order of
    1e-6, where eps 1e-5 and 1e-6 give different outputs: the video token projection is scaled down,
    and so is every LayerNorm of the text encoder (its last states come out of one)."""
    out = OrderedDict(sd)
    for key in ("video_token_proj.fc.weight", "video_token_proj.fc.bias"):
        out[key] = sd[key] * scale
    for key in sd:
        if key.startswith("fusion_text.") and ("LayerNorm" in key or "layer_norm" in key):
            out[key] = sd[key] * scale
    return out


@pytest.mark.parametrize("kind", ["labse", "distill"])
def test_converted_forward_equals_a_float64_hand_computation_where_layer_norm_eps_matters(kind, encoders, tmp_path):
    """Embeddings of a converted checkpoint equal the reference's math in float64 within 1e-5, on weights
    whose LayerNorm inputs have a variance near eps: a LayerNorm with PyTorch's eps 1e-5 instead of the
    reference's 1e-6 moves them by far more."""
    encoder_dir = encoders[ENCODER[kind]]
    sd = small_variance(reference_state(encoder_dir, seed=7))
    src = save_reference(tmp_path / "latest_model.pth", sd, arch=ARCH[kind])
    convert(src, tmp_path / "converted.pt", encoder_dir, DATA_CONFIG)
    model, _ = load_converted(tmp_path / "converted.pt")
    sd64 = {k: v.double() if v.is_floating_point() else v for k, v in sd.items()}
    video, mask = videos()
    tok = tokens(encoder_dir)
    with torch.no_grad():
        tokens_var = ref_gated(sd64, "video_token_proj", video.double()).var(-1, unbiased=False)
        assert tokens_var.max() < 1e-5  # the LayerNorm statistics the test is about
        expected_video = ref_video(sd64, video.double(), mask)
        expected_text = ref_text(sd64, encoder_dir, tok, tok.attention_mask)
        assert (model.encode_video(video, mask).double() - expected_video).abs().max() < 1e-5
        assert (model.encode_text(tok).double() - expected_text).abs().max() < 1e-5
        # The same math with eps 1e-5 in the video or text norm is far off: the comparison can fail.
        assert (ref_video(sd64, video.double(), mask, video_eps=1e-5) - expected_video).abs().max() > 1e-3
        assert (ref_text(sd64, encoder_dir, tok, tok.attention_mask, text_eps=1e-5)
                - expected_text).abs().max() > 1e-3


def test_student_mask_pooling_gives_the_reference_teacher_output(encoders, tmp_path):
    teacher_dir, student_dir = encoders["xlmr-tiny"], encoders["labse-tiny"]
    sd = reference_state(teacher_dir)
    src = save_reference(tmp_path / "latest_model.pth", sd, arch=ARCH["xlm"])
    convert(src, tmp_path / "own.pt", teacher_dir, DATA_CONFIG, student_mask_pooling=False)
    assert load_checkpoint(tmp_path / "own.pt")["config"]["model"]["pool_with_student_mask"] is False
    convert(src, tmp_path / "teacher.pt", teacher_dir, DATA_CONFIG)
    model, state = load_converted(tmp_path / "teacher.pt")
    assert state["config"]["model"]["pool_with_student_mask"] is True

    own, student = tokens(teacher_dir), tokens(student_dir)
    assert not torch.equal(own.attention_mask, student.attention_mask)
    with torch.no_grad():
        expected = ref_text(sd, teacher_dir, own, pool_mask=student.attention_mask)
        pooled = model.encode_text(own, pool_mask=student.attention_mask)
        torch.testing.assert_close(pooled, expected, atol=1e-5, rtol=0)
        assert (model.encode_text(own) - expected).abs().max() > 1e-3


def test_converted_teacher_loads_as_a_c2kd_teacher(encoders, tmp_path):
    from trainer.teachers import load_teacher
    sd = reference_state(encoders["mbert-tiny"])
    src = save_reference(tmp_path / "latest_model.pth", sd, ARCH["mbert"])
    convert(src, tmp_path / "mbert.pt", encoders["mbert-tiny"], DATA_CONFIG)
    teacher = load_teacher(tmp_path / "mbert.pt", FEATURE_DIM, torch.device("cpu"))
    # A reference teacher pooled with the student's mask (docs/reference.md §2.3).
    assert teacher.pool_with_student_mask
    video, mask = videos()
    with torch.no_grad():  # the teacher carries the converted weights
        torch.testing.assert_close(teacher.model.encode_video(video, mask), ref_video(sd, video, mask),
                                   atol=1e-5, rtol=0)


@pytest.mark.parametrize("dataset, cleaned", [("rudder", False), ("msrvtt", True)])
def test_converted_teacher_embeds_the_english_its_dataset_gave_it(dataset, cleaned, encoders, tmp_path):
    """A converted RUDDER teacher embeds the raw English caption, punctuation included, as the reference's
    RUDDER teachers read it; a teacher converted with MSR-VTT's recipe embeds the regex-cleaned caption
    (docs/reference.md §1.3). Both pool with the student tokenizer's mask of the raw caption (§2.3)."""
    from data_loader.readers import read_corpus
    from data_loader.dataset import clean_caption
    from model.model import load_tokenizer
    from parse_config import resolve
    from trainer.teachers import TeacherCache, load_teacher
    teacher_dir, student_dir = encoders["xlmr-tiny"], encoders["labse-tiny"]
    sd = reference_state(teacher_dir)
    src = save_reference(tmp_path / "latest_model.pth", sd, ARCH["xlm"])
    convert(src, tmp_path / "xlm.pt", teacher_dir, ROOT / "configs" / dataset / "base.json")
    captions = ["A man, cutting an onion! (in the kitchen)", "a dog runs in the park; then jumps."]
    g = torch.Generator().manual_seed(2)
    items = [{"id": f"r{i}", "2d": torch.randn(5, FEATURE_DIM, generator=g).numpy(), "captions": {"en": c, "hi": "x"}}
             for i, c in enumerate(captions)]
    path = tmp_path / "rudder_train.pkl"
    path.write_bytes(pickle.dumps(items))
    config = resolve({"stage": "c2kd", "data.layout": "rudder", "data.feature_dim": FEATURE_DIM,
                      "data.max_words_train": 40, "model.text_encoder": str(student_dir),
                      "teachers.cache_dir": str(tmp_path / "cache")})
    teacher = load_teacher(tmp_path / "xlm.pt", FEATURE_DIM, torch.device("cpu"))
    cache = TeacherCache(read_corpus(path, "rudder", "2d", "train"), config,
                         load_tokenizer(str(student_dir))).outputs(teacher)
    read = [clean_caption(c) if cleaned else c for c in captions]
    with torch.no_grad():
        expected = ref_text(sd, teacher_dir, tokens(teacher_dir, read), tokens(student_dir, captions).attention_mask)
    torch.testing.assert_close(cache["text"], F.normalize(expected, dim=1), atol=1e-5, rtol=0)
    assert [clean_caption(c) for c in captions] != captions  # punctuation that cleaning removes


def test_converted_checkpoint_runs_in_test_py(encoders, tmp_path):
    from data_loader import toy
    data = toy.generate(tmp_path / "toy", n_train=4, n_test=12, feature_dim=FEATURE_DIM)
    src = save_reference(tmp_path / "latest_model.pth", reference_state(encoders["xlmr-tiny"]), ARCH["xlm"])
    convert(src, tmp_path / "xlm.pt", encoders["xlmr-tiny"], DATA_CONFIG, pool_mask_tokenizer=encoders["labse-tiny"])
    spec = importlib.util.spec_from_file_location("test_entry", ROOT / "test.py")  # not the stdlib's test
    entry = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(entry)
    assert entry.main(["-r", str(tmp_path / "xlm.pt"), "-d", "cpu", "--set", f"data.eval_path={data['test']}",
                       "--set", f"trainer.save_dir={tmp_path / 'runs'}"]) == 0
    assert (tmp_path / "eval" / "xlm" / "metrics.json").is_file()


def optimistic_t2v(sims, query_ids, video_ids, denominator):
    """The reference's evaluation (docs/reference.md §4), by hand: a query's rank is the first position of
    its ground-truth score in its row sorted in descending order (ties count in its favour); R@K over ``denominator``;
    MedR and MeanR over the ranked queries, plus 1."""
    ranks = []
    for row, query in zip(sims, query_ids):
        truth = row[video_ids.index(query)]
        ranks.append(int(np.flatnonzero(np.sort(row)[::-1] == truth)[0]))
    ranks = np.array(ranks)
    return {"R1": 100 * (ranks < 1).sum() / denominator, "R5": 100 * (ranks < 5).sum() / denominator,
            "R10": 100 * (ranks < 10).sum() / denominator, "MedR": np.median(ranks) + 1, "MeanR": ranks.mean() + 1}


def test_parity_preset_gives_the_reference_evaluation_of_a_converted_checkpoint(encoders, tmp_path):
    """test.py with configs/msrvtt/clip/parity.json on a converted reference student and a 968-video test
    file: the similarities are the reference model's (within 1e-5) and R@1/5/10, MedR and MeanR are the
    reference's optimistic ranks over 1000 videos, computed by hand from them."""
    from data_loader import toy
    encoder_dir = encoders["labse-tiny"]
    data = toy.generate(tmp_path / "toy", n_train=4, n_test=968, feature_dim=FEATURE_DIM)
    items = pickle.loads(data["test"].read_bytes())
    for a, b in ((0, 1), (10, 11), (20, 21)):  # identical videos: their captions' ground truth is tied
        items[b]["2d"] = items[a]["2d"].copy()
    (tmp_path / "test_968.pkl").write_bytes(pickle.dumps(items))
    sd = reference_state(encoder_dir, seed=5)
    src = save_reference(tmp_path / "latest_model.pth", sd, ARCH["labse"])
    convert(src, tmp_path / "student.pt", encoder_dir, DATA_CONFIG)
    spec = importlib.util.spec_from_file_location("test_entry", ROOT / "test.py")  # not the stdlib's test
    entry = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(entry)
    out, sims_dir = tmp_path / "eval", tmp_path / "sims"
    assert entry.main(["-r", str(tmp_path / "student.pt"), "-c", str(ROOT / "configs/msrvtt/clip/parity.json"),
                       "-d", "cpu", "--out", str(out), "--save-sims", str(sims_dir),
                       "--set", f"data.eval_path={tmp_path / 'test_968.pkl'}", "--set", f"data.feature_dim={FEATURE_DIM}",
                       "--set", f"model.projection_dim={PROJ}", "--set", f"trainer.save_dir={tmp_path / 'runs'}"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())["metrics"]

    # The reference model's similarities for the English captions: frames cut to 30 and L2-normalised,
    # captions padded to 40 tokens (docs/reference.md §1.3, §1.4).
    video = torch.zeros(len(items), 30, FEATURE_DIM, dtype=torch.float64)
    mask = torch.zeros(len(items), 30)
    for i, item in enumerate(items):
        frames = torch.from_numpy(item["2d"][:30]).double()
        video[i, :len(frames)] = frames / frames.norm(dim=1, keepdim=True)
        mask[i, :len(frames)] = 1
    sd64 = {k: v.double() if v.is_floating_point() else v for k, v in sd.items()}
    tok = tokens(encoder_dir, [item["eval_caption_en"] for item in items])
    with torch.no_grad():
        reference = F.normalize(ref_text(sd64, encoder_dir, tok, tok.attention_mask), dim=1) @ \
            F.normalize(ref_video(sd64, video, mask), dim=1).T
    ids = json.loads((sims_dir / "en.json").read_text())
    assert ids["query_ids"] == ids["video_ids"] == [item["id"] for item in items]
    assert np.abs(np.load(sims_dir / "en.npy") - reference.numpy()).max() < 1e-5
    # test.py's metrics equal those of the reference's own similarities, ranked optimistically by hand.
    expected = optimistic_t2v(reference.numpy(), ids["query_ids"], ids["video_ids"], denominator=1000)
    assert {k: metrics["en"]["t2v"][k] for k in expected} == pytest.approx(expected, abs=1e-9)

    tied = 0
    for lang in ("en", "de", "sw"):
        sims = np.load(sims_dir / f"{lang}.npy")
        ids = json.loads((sims_dir / f"{lang}.json").read_text())
        expected = optimistic_t2v(sims, ids["query_ids"], ids["video_ids"], denominator=1000)
        got = metrics[lang]["t2v"]
        assert got["num_queries"] == 968
        assert {k: got[k] for k in expected} == pytest.approx(expected, abs=1e-9), lang
        tied += sum((row == row[i]).sum() > 1 for i, row in enumerate(sims))
    assert tied > 0  # the optimistic rule was exercised


def test_inference_of_a_converted_teacher_pools_with_the_student_mask(encoders, tmp_path):
    from utils.inference import Retriever
    teacher_dir, student_dir = encoders["xlmr-tiny"], encoders["labse-tiny"]
    sd = reference_state(teacher_dir)
    src = save_reference(tmp_path / "latest_model.pth", sd, ARCH["xlm"])
    convert(src, tmp_path / "xlm.pt", teacher_dir, DATA_CONFIG, pool_mask_tokenizer=student_dir)
    retriever = Retriever.from_checkpoint(tmp_path / "xlm.pt")
    max_words = retriever.config["data"]["max_words_eval"]
    own, student = tokens(teacher_dir, length=max_words), tokens(student_dir, length=max_words)
    with torch.no_grad():
        expected = F.normalize(ref_text(sd, teacher_dir, own, pool_mask=student.attention_mask), dim=1)
    torch.testing.assert_close(retriever.encode_texts(CAPTIONS[:4]), expected, atol=1e-5, rtol=0)


def test_malicious_pickle_is_refused_and_nothing_runs(tmp_path):
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    path = tmp_path / "evil.pth"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "config": Payload()}, path)
    with pytest.raises(ConvertError, match=r"refused global (posix|nt)\.system") as err:
        convert(path, tmp_path / "out.pt", "unused", DATA_CONFIG)
    assert "\n" not in str(err.value) and str(path) in str(err.value)
    assert not marker.exists() and not (tmp_path / "out.pt").exists()


def test_unknown_key_fails_unless_allowed(encoders, tmp_path):
    sd = reference_state(encoders["distiluse-tiny"])
    sd["fusion_video.extra_head.weight"] = torch.zeros(3)
    src = save_reference(tmp_path / "latest_model.pth", sd, ARCH["distill"])
    with pytest.raises(ConvertError, match=r"unknown key.*'fusion_video\.extra_head\.weight'.*--allow-unknown"):
        convert(src, tmp_path / "out.pt", encoders["distiluse-tiny"], DATA_CONFIG)
    summary = convert(src, tmp_path / "out.pt", encoders["distiluse-tiny"], DATA_CONFIG, allow_unknown=True)
    assert summary["unknown"] == ["fusion_video.extra_head.weight"]
    load_converted(tmp_path / "out.pt")


def test_mismatches_name_the_key(encoders, tmp_path):
    src = save_reference(tmp_path / "latest_model.pth", reference_state(encoders["xlmr-tiny"]), ARCH["xlm"])
    with pytest.raises(ConvertError, match=r"'fusion_text\.[^']+' has shape .*check --text-encoder"):
        convert(src, tmp_path / "out.pt", encoders["labse-tiny"], DATA_CONFIG)
    with pytest.raises(ConvertError, match=r"takes 24-d frame features, but --feature-dim is 512"):
        convert(src, tmp_path / "out.pt", encoders["xlmr-tiny"], DATA_CONFIG, feature_dim=512)


def test_cli(encoders, tmp_path, capsys):
    sd = reference_state(encoders["mbert-tiny"])
    sd["unexpected.weight"] = torch.zeros(1)
    src = save_reference(tmp_path / "latest_model.pth", sd, ARCH["mbert"])
    out = tmp_path / "mbert.pt"
    cmd = [sys.executable, "-m", "utils.convert_checkpoint", str(src), str(out),
           "--text-encoder", str(encoders["mbert-tiny"]), "--feature-dim", str(FEATURE_DIM),
           "--data-config", str(ROOT / "configs" / "rudder" / "base.json")]
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 2 and not out.exists()
    assert run.stderr.count("\n") == 1 and run.stderr.startswith("error: ") and "'unexpected.weight'" in run.stderr
    assert main(cmd[3:] + ["--allow-unknown", "--own-mask-pooling"]) == 0
    assert load_checkpoint(out)["config"]["model"]["pool_with_student_mask"] is False
    # The output says which English the teacher reads: RUDDER's teachers read the caption as written.
    assert "English: teacher reading English as written (data.clean_english false" in capsys.readouterr().out


def test_the_data_config_must_say_how_teachers_read_english(encoders, tmp_path):
    src = save_reference(tmp_path / "latest_model.pth", reference_state(encoders["mbert-tiny"]), ARCH["mbert"])
    silent = tmp_path / "mydata.json"
    silent.write_text('{"data": {"layout": "rudder"}}')
    with pytest.raises(ConvertError, match=r"mydata\.json: sets no 'data\.clean_english'"):
        convert(src, tmp_path / "out.pt", encoders["mbert-tiny"], silent)
    assert not (tmp_path / "out.pt").exists()


def test_the_output_names_the_youcook2_field_each_model_reads(encoders, tmp_path, capsys):
    """Under data.student_english = caption_en the converted student reads 'caption_en', a teacher
    'caption' (the reference's inputs, docs/reference.md §1.2); the converter says which."""
    recipe = tmp_path / "youcook2.json"
    recipe.write_text(json.dumps({"extends": str(ROOT / "configs" / "youcook2" / "base.json"),
                                  "data": {"student_english": "caption_en", "feature_dim": FEATURE_DIM}}))
    lines = {}
    for kind, encoder in (("labse", "labse-tiny"), ("mbert", "mbert-tiny")):
        src = save_reference(tmp_path / f"{kind}.pth", reference_state(encoders[encoder]), ARCH[kind])
        assert main([str(src), str(tmp_path / f"{kind}.pt"), "--text-encoder", str(encoders[encoder]),
                     "--data-config", str(recipe)]) == 0
        lines[kind] = next(line for line in capsys.readouterr().out.splitlines() if "English:" in line)
    assert "English: student reading English as written of each item's 'caption_en'" in lines["labse"]
    assert "English: teacher reading regex-cleaned English of each item's 'caption'" in lines["mbert"]
