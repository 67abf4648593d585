"""utils.benchmark: a quick smoke run (every section), the full-size GPU step code on tiny shapes, FLOP counting by hand.
Timings are never asserted: they depend on the machine and its load."""
import json

import pytest
import torch

from utils.benchmark.cli import main
from utils.benchmark.data import tile_corpus
from utils.benchmark.flops import c2kd_step_flops, peak_bf16_flops, text_forward_flops, video_forward_flops
from utils.benchmark.gpu import bench_gpu_step
from utils.tiny_encoders import build_backbone
from model.model import TextEncoder, VideoEncoder


def _bert(h=32, layers=2, inter=64, vocab=100):
    return build_backbone("bert", dict(vocab_size=vocab, hidden_size=h, num_hidden_layers=layers,
                                       num_attention_heads=2, intermediate_size=inter))


def test_text_forward_flops_by_hand():
    h, inter, layers, proj = 32, 64, 2, 16
    encoder = TextEncoder(_bert(h, layers, inter), projection_dim=proj)
    per_layer = (4 * (h * h + h)          # query, key, value, attention output
                 + 2 * h                  # attention LayerNorm
                 + (h * inter + inter)    # intermediate
                 + (inter * h + h)        # output
                 + 2 * h)                 # output LayerNorm
    per_token = layers * per_layer + 2 * h  # plus the embedding LayerNorm; the tables are lookups
    per_sequence = (h * h + h) + 2 * h + (h * proj + proj) + (proj * proj + proj)  # pooler, norm, gated proj
    sequences, seq_len = 6, 11
    assert text_forward_flops(encoder, sequences, seq_len) == \
        2 * (per_token * sequences * seq_len + per_sequence * sequences)


def test_video_forward_flops_by_hand():
    d, w, p = 8, 16, 12
    video = VideoEncoder(d, width=w, projection_dim=p, depth=1, heads=2, mlp_ratio=1.0)
    per_frame = (d * w + w) + (w * w + w) + 2 * w                      # gated input projection, LayerNorm
    per_block_token = 2 * w + (w * 3 * w + 3 * w) + (w * w + w) + 2 * w + 2 * (w * w + w)
    per_video = (w * p + p) + (p * p + p)                             # gated output projection on CLS
    videos, frames = 5, 7
    assert video_forward_flops(video, videos, frames) == \
        2 * videos * (per_frame * frames + per_block_token * (frames + 1) + per_video)


def test_c2kd_step_flops_counts_teachers_only_online():
    torch.manual_seed(0)
    student = benchmark_model(_bert(32, 2, 64))
    teachers = [benchmark_model(_bert(32, 1, 64)), benchmark_model(_bert(32, 2, 64))]
    b, langs, seq, frames = 4, 9, 10, 6
    student_fwd = (text_forward_flops(student.text, b * langs, seq)
                   + video_forward_flops(student.video, b, frames))
    teacher_fwd = sum(text_forward_flops(t.text, b, seq) + video_forward_flops(t.video, b, frames)
                      for t in teachers)
    online = c2kd_step_flops(student, teachers, b, langs, seq, frames, online=True)
    cached = c2kd_step_flops(student, teachers, b, langs, seq, frames, online=False)
    assert online == {"student": 3 * student_fwd, "teachers": teacher_fwd, "total": 3 * student_fwd + teacher_fwd}
    assert cached == {"student": 3 * student_fwd, "teachers": 0.0, "total": 3 * student_fwd}
    # Length buckets: each bucket's rows at its own columns.
    buckets = [(20, 4), (16, seq)]
    bucketed = c2kd_step_flops(student, teachers, b, langs, seq, frames, online=False, student_buckets=buckets)
    text_fwd = text_forward_flops(student.text, 20, 4) + text_forward_flops(student.text, 16, seq)
    assert bucketed["student"] == 3 * (text_fwd + video_forward_flops(student.video, b, frames))
    assert bucketed["student"] < cached["student"]


def benchmark_model(backbone):
    from model.model import RetrievalModel
    return RetrievalModel(TextEncoder(backbone, 16), VideoEncoder(8, width=16, projection_dim=16, depth=1, heads=2))


def test_peak_flops_by_device_name():
    assert peak_bf16_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_bf16_flops("NVIDIA H200") == 989e12
    assert peak_bf16_flops("NVIDIA H100 PCIe") == 756e12
    assert peak_bf16_flops("Tesla T4") is None


TINY_SHAPES = {
    "student": ("bert", dict(vocab_size=120, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                             intermediate_size=32)),
    "teachers": [(family, dict(vocab_size=90, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=32)) for family in ("xlmr", "bert", "distilbert")],
}


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device"))])
def test_full_size_step_code_runs_on_tiny_shapes(one_thread, device):
    out = bench_gpu_step(torch.device(device), shapes=TINY_SHAPES, batch_size=4, languages=3, seq_len=6,
                         n_video_tokens=5, feature_dim=8, video_width=16, projection_dim=16,
                         steps=1, warmup=1, peak_flops=1e12)
    for mode in ("cached", "online"):
        step = out[mode]
        assert step["step_s"] > 0
        assert step["mfu"] == pytest.approx(step["model_flops"] / step["step_s"] / 1e12)
    assert out["cached"]["teacher_flops"] == 0 and out["online"]["teacher_flops"] > 0
    assert out["online"]["student_flops"] == out["cached"]["student_flops"]
    if device == "cpu":
        assert out["autocast"] == "off"  # plain fp32, as the trainer does on the CPU


def test_quick_run_writes_every_section(tmp_path, toy_assets, capsys):
    out = tmp_path / "bench.json"
    argv = ["--quick", "--out", str(out), "--eval-sizes", "200", "--search-sizes", "2000"]
    if torch.cuda.is_available():  # full-size models take long to build; their code is tested on tiny shapes
        argv += ["--skip", "gpu"]
    assert main(argv, assets=toy_assets) == 0
    report = json.loads(out.read_text())
    assert report["command"].startswith("python -m utils.benchmark --quick")
    data = report["data_pipeline"]
    for key in ("project_setup_s", "project_items_per_s", "reference_items_per_s", "steady_state_ratio",
                "one_epoch_with_setup_ratio"):
        assert data[key] > 0, key
    step = report["c2kd_step"]
    for key in ("cached_step_s", "online_step_s", "online_over_cached", "cache_build_s", "cache_build_full_padding_s"):
        assert step[key] > 0, key
    for key in ("cached_step_s", "online_step_s", "online_over_cached"):
        assert step["without_student_dropout"][key] > 0, key
    assert step["online_reference_step_s"] > 0 and step["online_reference_over_cached"] > 0
    # Only the reference-style variant runs its teachers with dropout; this project's do not.
    assert step["teachers_in_train_mode"] == {"online": False, "online_no_dropout": False, "online_reference": True,
                                              "reference": True}
    # Only the reference's step and the full-padding diagnostic run every text column.
    cut = step["cuts_text_padding"]
    assert cut.pop("reference") == [False] * 4 and cut.pop("cached_full_padding") == [False]
    assert all(all(flags) for flags in cut.values()) and len(cut["online"]) == 4
    assert step["reference_step_s"] > 0 and step["full_padding_over_one_bucket"] > 0 and step["one_bucket_over_buckets"] > 0
    # The student's captions run in length buckets, but for the one-batch and the reference-style steps.
    rows = step["student_bucket_rows"]
    assert rows == 128 and step["bucket_rows_by_variant"] == {
        "cached": rows, "cached_no_dropout": rows, "cached_one_bucket": None, "cached_full_padding": None,
        "online": rows, "online_no_dropout": rows, "online_reference": rows, "reference": None}
    lengths = step["text_lengths"]
    buckets = lengths["student_buckets"]
    assert sum(r for r, _ in buckets) == step["batch_size"] * len(step["languages"]) and len(buckets) > 1
    assert [c for _, c in buckets] == sorted(c for _, c in buckets) and buckets[-1][1] == lengths["student_one_bucket"]
    assert 0 < lengths["student_one_bucket"] <= lengths["max_words"] and len(lengths["teachers"]) == 3
    flops = step["model_flops"]
    assert flops["student"] > flops["teachers"] > 0
    assert flops["online_over_cached_bound"] == pytest.approx(1 + flops["teachers"] / flops["student"])
    (row,) = report["evaluation"]["sizes"]
    assert row["n"] == 200 and row["same_metrics"]
    for method in ("matrix", "two_pass", "one_pass", "products"):
        assert row[method]["seconds"] > 0 and row[method]["peak_mib"] >= 0
    assert row["two_pass_over_one_pass"] > 0 and row["one_pass_over_products"] > 0
    if not torch.cuda.is_available():
        assert report["gpu_step"] == {"skipped": "no CUDA device"}
    extraction = report["extraction"]["encoders"]
    assert extraction["clip"]["units_per_video"] == 2 and extraction["s3d"]["units_per_video"] == 1  # 2 s videos
    for row in extraction.values():
        assert row["decode_videos_per_s"] > 0 and row["encode_videos_per_s"]["cpu"] > 0
    (search,) = report["search"]["sizes"]
    assert search["n"] == 2000 and search["nlist"] == 32 and set(search["build_s"]) == {"torch", "faiss_exact", "faiss_ivf"}
    methods = search["methods"]
    assert list(methods) == ["torch", "faiss_exact", "ivf_nprobe_4", "ivf_nprobe_32"]
    assert all(m["batch_qps"] > 0 and m["single_qps"] > 0 for m in methods.values())
    # Exact search in torch and IVF over every cell find the exact top 10 (but where float rounding
    # swaps two nearly equal scores); 4 cells of 32 find fewer.
    assert methods["torch"]["recall"] >= 0.999 and methods["ivf_nprobe_32"]["recall"] >= 0.999
    assert methods["ivf_nprobe_4"]["recall"] < 0.95
    assert search["ivf_at_recall_0.95"]["method"] == "ivf_nprobe_32"
    printed = capsys.readouterr().out
    assert "steady state" in printed and "online/cached" in printed and "reference/cached" in printed and f"wrote {out}" in printed


@pytest.mark.parametrize("n", [1, 5])
def test_tile_corpus_repeats_items(toy_assets, n):
    from data_loader.readers import read_corpus
    corpus = read_corpus(toy_assets["train"], "multi-msrvtt", "2d", "train")
    tiled = tile_corpus(corpus, len(corpus) * n + 3)
    assert len(tiled) == len(corpus) * n + 3 and len(set(tiled.ids)) == len(tiled)
    assert tiled.captions["de"][len(corpus)] == corpus.captions["de"][0]
