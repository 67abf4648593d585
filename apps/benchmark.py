"""Throughput benchmarks, measured as ratios within one run on one machine.

    python -m apps.benchmark [--out benchmark.json] [--quick] [--eval-sizes 1000,10000]
                              [--search-sizes 100000,1000000] [--skip data,c2kd,eval,gpu,search]

1. data pipeline: items per second of this project's loader (captions tokenized once per
   tokenizer, c2kd-reference §1.3 fixed) against a loader that tokenizes every caption of every
   language with every tokenizer on each access, as the reference did; the one-off
   pre-tokenization is reported separately and folded into a one-epoch ratio.
2. C2KD training step (``Trainer.training_step``) with cached against online teachers, on
   Multi-Toy with the tiny encoders and three randomly initialised teachers; also online teachers
   left in train mode as the reference ran them, with and without the padding cut (the reference
   ran every text column up to max_words), and, as diagnostics, the step with the student's
   dropout off, the cached step without the padding cut, and the counted model FLOPs.
3. ranking N x N: ``retrieval_metrics_from_embeddings`` (one pass: each score computed once)
   against the two-pass ranking it replaced, ``retrieval_metrics`` on a materialised matrix and
   the matrix products alone (the floor); time and peak memory, one subprocess per measurement.
4. on a CUDA device only: a training step of a LaBSE-shaped student with three base-sized
   teachers (random weights), cached and online, bf16 autocast, with model FLOPs utilisation.
5. feature extraction (``data_loader.extract``): videos per second decoded and prepared by one
   decoding process, and encoded by CLIP ViT-B/32 and by S3D (random weights, full size) on the
   CPU and, when there is one, on the GPU.
6. search at scale: ``VideoIndex`` over N random 512-d unit vectors, searched by torch brute
   force, exact FAISS and FAISS IVF at several ``nprobe``: build time, queries per second (in one
   batch, and one query per call as a search page asks) and recall@10 against exact search.

Timings of two variants are interleaved (A B A B ...) and medians are reported, so that a
machine shared with other work still gives comparable ratios.
"""
import argparse
import copy
import json
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn as nn
import torch.nn.functional as F

from data_loader.corpus import ENGLISH
from apps.tiny_encoders import build_backbone

ROOT = Path(__file__).resolve().parents[1]
TEACHER_ENCODERS = ("xlmr-tiny", "mbert-tiny", "distiluse-tiny")
# The reference's teacher suffixes (§1.3), in the order of TEACHER_ENCODERS.
TEACHER_SUFFIXES = ("xlm", "mbert", "distill")

# Peak dense bf16 tensor FLOP/s by device name (no sparsity).
PEAK_BF16_FLOPS = (("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12), ("A100", 312e12))


# ---- timing helpers ------------------------------------------------------------------------------
def _sync(device):
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device=None):
    _sync(device)
    start = time.perf_counter()
    out = fn()
    _sync(device)
    return time.perf_counter() - start, out


def interleaved(variants, repeats, device=None):
    """Run each variant ``repeats`` times in the order A B A B ...; {name: [seconds, ...]}."""
    times = {name: [] for name in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            times[name].append(timed(fn, device)[0])
    return times


def median(values):
    return float(statistics.median(values))


# ---- 1. data pipeline ----------------------------------------------------------------------------
def tile_corpus(corpus, n_items):
    """The first ``n_items`` items of ``corpus``, repeated as often as needed."""
    from data_loader.corpus import Corpus
    idx = [i % len(corpus) for i in range(n_items)]
    return Corpus(path=corpus.path, ids=[f"{corpus.ids[i]}#{k}" for k, i in enumerate(idx)],
                  features=[corpus.features[i] for i in idx],
                  captions={lang: [caps[i] for i in idx] for lang, caps in corpus.captions.items()})


class ReferenceStyleDataset(torch.utils.data.Dataset):
    """Tokenizes on every access, as the reference's loaders did (c2kd-reference §1.3).

    Per item: one caption index drawn with Python's ``random`` and shared by all languages; the
    English caption regex-cleaned and tokenized by the student and by every teacher tokenizer;
    then the caption of every language tokenized by the student and by every teacher tokenizer.
    Each call pads to ``max_words`` and returns tensors with the reference's shapes (input ids
    [L], attention mask [1, L], no token type ids). The word2vec lookup and the audio padding
    the reference also did per item are left out, so this loader is, if anything, faster than
    the reference's.
    """

    def __init__(self, corpus, student_tokenizer, teacher_tokenizers, max_words, n_video_tokens):
        self.corpus, self.student, self.teachers = corpus, student_tokenizer, dict(teacher_tokenizers)
        self.max_words, self.n_video_tokens = max_words, n_video_tokens

    def __len__(self):
        return len(self.corpus)

    def _tokenize(self, tokenizer, text):
        enc = tokenizer(text, padding="max_length", max_length=self.max_words, truncation=True,
                        return_tensors="pt")
        return {"input_ids": enc["input_ids"].squeeze(0), "attention_mask": enc["attention_mask"]}

    def __getitem__(self, idx):
        from data_loader.dataset import clean_caption, video_tokens
        video, video_mask = video_tokens(self.corpus.features[idx], self.n_video_tokens)
        cap = random.randrange(max(1, len(self.corpus.captions[ENGLISH][idx])))
        raw_text = clean_caption(self.corpus.captions[ENGLISH][idx][cap])
        out = {"index": idx, "video": video, "video_mask": video_mask,
               "tokens": self._tokenize(self.student, raw_text)}
        for suffix, tok in self.teachers.items():
            out[f"tokens_{suffix}"] = self._tokenize(tok, raw_text)
        for lang, captions in self.corpus.captions.items():
            caps = captions[idx]
            text = caps[min(cap, len(caps) - 1)] if caps else ""
            out[lang] = self._tokenize(self.student, text)
            for suffix, tok in self.teachers.items():
                out[f"{lang}_{suffix}"] = self._tokenize(tok, text)
        return out


def _epoch(loader):
    items = 0
    for batch in loader:
        items += len(batch["index"])
    return items


def bench_data(assets, n_items=None, repeats=3, batch_size=64, max_words=35, n_video_tokens=30):
    """Items per second of the project's loader against the reference-style loader."""
    from data_loader.readers import read_corpus
    from data_loader.dataset import STUDENT, EnglishReading, RetrievalDataset, TextInput
    from data_loader.loaders import EpochSampler, make_loader
    from model.model import load_tokenizer

    corpus = read_corpus(assets["train"], "multi-msrvtt", "2d", "train")
    n_items = n_items or len(corpus)
    corpus = tile_corpus(corpus, n_items)
    student = load_tokenizer(str(assets["encoders"]["labse-tiny"]))
    teachers = {s: load_tokenizer(str(assets["encoders"][name])) for s, name in zip(TEACHER_SUFFIXES, TEACHER_ENCODERS)}
    # The c2kd setup with online teachers: the student reads every language, each teacher English.
    inputs = [TextInput(STUDENT, student, corpus.languages),
              *(TextInput(f"teacher{i}", tok, [ENGLISH], EnglishReading(teacher=True, clean=True))
                for i, tok in enumerate(teachers.values()))]

    def sampler():
        return EpochSampler(n_items, batch_size, seed=0, shuffle=True, drop_last=False)

    state = {}

    def project_setup():
        state["dataset"] = RetrievalDataset(corpus, inputs, max_words, n_video_tokens, train=True, seed=0)

    def project_epoch():
        assert _epoch(make_loader(state["dataset"], batch_size, sampler(), 0, seed=0)) == n_items

    reference = ReferenceStyleDataset(corpus, student, teachers, max_words, n_video_tokens)

    def reference_epoch():
        assert _epoch(make_loader(reference, batch_size, sampler(), 0, seed=0)) == n_items

    random.seed(0)
    project_setup()  # warm-up: first use of each tokenizer, allocator
    project_epoch()
    reference_epoch()
    times = interleaved({"project_setup": project_setup, "project_epoch": project_epoch,
                         "reference_epoch": reference_epoch}, repeats)
    setup, epoch, ref = (median(times[k]) for k in ("project_setup", "project_epoch", "reference_epoch"))
    return {
        "items": n_items, "batch_size": batch_size, "languages": corpus.languages,
        "captions_per_item": float(sum(len(c) for c in corpus.captions[ENGLISH]) / n_items),
        "max_words": max_words, "n_video_tokens": n_video_tokens, "num_workers": 0, "repeats": repeats,
        "tokenizers": {"student": "labse-tiny", "teachers": list(TEACHER_ENCODERS)},
        "tokenizer_calls_per_item": {"project": 0,
                                     "reference": (1 + len(teachers)) * (1 + len(corpus.languages))},
        "project_setup_s": setup,
        "project_epoch_s": epoch,
        "reference_epoch_s": ref,
        "project_items_per_s": n_items / epoch,
        "reference_items_per_s": n_items / ref,
        "steady_state_ratio": ref / epoch,
        "one_epoch_with_setup_ratio": ref / (setup + epoch),
        "samples_s": times,
    }


# ---- 2. C2KD training step on Multi-Toy ----------------------------------------------------------
def make_random_teachers(assets, folder, base_flat):
    """Checkpoints of three randomly initialised toy teachers (one per teacher encoder)."""
    from model.model import build_model
    from parse_config import resolve
    from utils.checkpoint import save_checkpoint

    paths = []
    for i, name in enumerate(TEACHER_ENCODERS):
        config = resolve({**base_flat, "stage": "translate-train", "teachers.checkpoints": [],
                          "model.text_encoder": str(assets["encoders"][name])}, name=f"teacher_{name}")
        torch.manual_seed(100 + i)
        model = build_model(config["model"], config["data"]["feature_dim"], pretrained_text=True)
        paths.append(str(save_checkpoint({"model": model.state_dict(), "config": config},
                                         Path(folder) / f"teacher_{name}.pt")))
    return paths


def _toy_c2kd_flat(assets, folder):
    from parse_config import load_flat
    flat = load_flat(ROOT / "configs" / "toy" / "c2kd.json")
    flat.update({"data.train_path": str(assets["train"]), "data.eval_path": str(assets["test"]),
                 "model.text_encoder": str(assets["encoders"]["labse-tiny"]),
                 "trainer.save_dir": str(Path(folder) / "runs"),
                 "teachers.cache_dir": str(Path(folder) / "teacher_cache")})
    return flat


def bench_c2kd_step(assets, device, steps=20, warmup=2):
    """Trainer.training_step with cached against online teachers: same batch, same initial model."""
    from data_loader.dataset import STUDENT
    from model.model import length_buckets, load_tokenizer, model_from_config, row_lengths, used_length
    from parse_config import resolve
    from trainer.build import build_loaders, build_loss, load_corpora
    from trainer.teachers import Teachers, build_teachers
    from trainer.trainer import Trainer, seed_everything
    from utils.device import to_device

    with tempfile.TemporaryDirectory(prefix="c2kd-bench-") as folder:
        flat = _toy_c2kd_flat(assets, folder)
        flat["teachers.checkpoints"] = make_random_teachers(assets, folder, flat)
        configs = {mode: resolve({**flat, "teachers.mode": mode}, name="c2kd") for mode in ("cached", "online")}
        seed_everything(0)
        corpora = load_corpora(configs["online"])
        tokenizer = load_tokenizer(configs["online"]["model"]["text_encoder"])
        teachers = {mode: build_teachers(configs[mode], corpora["train"], device, tokenizer)
                    for mode in ("online", "cached")}
        # The reference's design: online teachers left in train mode, so their dropout runs too
        # (c2kd-reference §3.1; this project puts teachers in eval mode). Timed, never trained with.
        # "reference" also runs every text column up to max_words, as the reference padded (§1.3).
        train_mode_teachers = {}
        for name, cut_padding in (("online_reference", True), ("reference", False)):
            train_mode_teachers[name] = build_teachers(configs["online"], corpora["train"], device, tokenizer)
            for teacher in train_mode_teachers[name].teachers:
                teacher.model.train()
                teacher.model.text.cut_padding = cut_padding
        # The work of the one-off cache build: every teacher embeds the training set (timed on
        # later passes, with the teachers loaded; loading and writing the file are left out), with
        # the padding cut and, as the reference padded, over every text column.
        def set_cut_padding(cut_padding):
            for t in teachers["cached"].teachers:
                t.model.text.cut_padding = cut_padding

        def build_cache(cut_padding):
            set_cut_padding(cut_padding)
            for t in teachers["cached"].teachers:
                teachers["cached"].embed_training_set(t)

        cache_build = interleaved({"cut": lambda: build_cache(True), "full_padding": lambda: build_cache(False)},
                                  3 if steps > 2 else 1, device)
        set_cut_padding(True)
        model, _ = model_from_config(configs["online"], tokenizer=tokenizer)
        # The online loader also carries the teachers' tokens; the cached step ignores them.
        train_loader, eval_loader = build_loaders(configs["online"], corpora, tokenizer,
                                                  extra_inputs=teachers["online"].text_inputs)
        train_loader.sampler.set_epoch(0)
        batch = next(iter(train_loader))
        # "<mode>" trains as usual; "<mode>_no_dropout" runs the same step with the student in eval
        # mode, to show how much of the student's step is dropout; "cached_one_bucket" runs the
        # student's captions as one batch cut to the longest, and "cached_full_padding" every text
        # column (diagnostics, not training modes).
        # name: (mode, teachers, student in train mode, student cuts padding, student's bucket rows)
        rows = model.text.bucket_rows
        variants = {"cached": ("cached", teachers["cached"], True, True, rows),
                    "cached_no_dropout": ("cached", teachers["cached"], False, True, rows),
                    "cached_one_bucket": ("cached", teachers["cached"], True, True, None),
                    "cached_full_padding": ("cached", teachers["cached"], True, False, None),
                    "online": ("online", teachers["online"], True, True, rows),
                    "online_no_dropout": ("online", teachers["online"], False, True, rows),
                    "online_reference": ("online", train_mode_teachers["online_reference"], True, True, rows),
                    "reference": ("online", train_mode_teachers["reference"], True, False, None)}
        trainers = {}
        for variant, (mode, variant_teachers, training, cut_padding, bucket_rows) in variants.items():
            loss = build_loss(configs[mode], num_teachers=len(variant_teachers)).to(device)
            trainers[variant] = Trainer(configs[mode], copy.deepcopy(model).to(device), loss, train_loader,
                                        eval_loader, device, None, teachers=variant_teachers)
            trainers[variant].forward.train(training)
            trainers[variant].model.text.cut_padding = cut_padding
            trainers[variant].model.text.bucket_rows = bucket_rows
        for _ in range(warmup):
            for trainer in trainers.values():
                trainer.training_step(batch)
        times = interleaved({name: (lambda t=t: t.training_step(batch)) for name, t in trainers.items()},
                            steps, device)
        batch_dev = to_device(batch, device)
        targets = interleaved({mode: (lambda t=teachers[mode]: t.similarities(batch_dev)) for mode in teachers},
                              steps, device)
        step_s = {name: median(v) for name, v in times.items()}
        cached, online = step_s["cached"], step_s["online"]
        cfg = configs["cached"]
        # Text columns the steps run: the student's captions of all languages, in buckets of
        # similar length (rows, columns) or as one batch, and each teacher's English.
        student_masks = torch.cat([t["attention_mask"] for t in batch["text"][STUDENT].values()])
        buckets = [(len(student_masks[r]), n) for r, n in length_buckets(row_lengths(student_masks), rows)]
        lengths = {"max_words": cfg["data"]["max_words_train"], "student_buckets": buckets,
                   "student_one_bucket": used_length(student_masks),
                   "teachers": [used_length(batch["text"][Teachers.input_name(i)][ENGLISH]["attention_mask"])
                                for i in range(len(teachers["online"]))]}
        flops = c2kd_step_flops(model, [t.model for t in teachers["online"].teachers], cfg["data"]["batch_size"],
                                len(trainers["cached"].languages), lengths["student_one_bucket"],
                                cfg["data"]["n_video_tokens"], online=True, teacher_seq_lens=lengths["teachers"],
                                student_buckets=buckets)
        return {
            "device": str(device), "steps": steps, "warmup": warmup,
            "batch_size": cfg["data"]["batch_size"], "languages": trainers["cached"].languages,
            "max_words": cfg["data"]["max_words_train"], "n_video_tokens": cfg["data"]["n_video_tokens"],
            "text_lengths": lengths, "student": "labse-tiny", "teachers": list(TEACHER_ENCODERS),
            "cached_step_s": cached, "online_step_s": online, "online_over_cached": online / cached,
            "online_reference_step_s": step_s["online_reference"],
            "online_reference_over_cached": step_s["online_reference"] / cached,
            "reference_step_s": step_s["reference"], "reference_over_cached": step_s["reference"] / cached,
            "student_bucket_rows": rows,
            "cached_one_bucket_step_s": step_s["cached_one_bucket"],
            "one_bucket_over_buckets": step_s["cached_one_bucket"] / cached,
            "cached_full_padding_step_s": step_s["cached_full_padding"],
            "full_padding_over_one_bucket": step_s["cached_full_padding"] / step_s["cached_one_bucket"],
            # Whether each online variant's teachers ran in train mode (dropout on) during its steps.
            "teachers_in_train_mode": {name: all(t.model.training for t in trainer.teachers.teachers)
                                       for name, trainer in trainers.items() if trainer.teachers.mode == "online"},
            # Whether each variant's text encoders (student, then online teachers) cut padding columns,
            # and the student's rows per length bucket (None: one bucket).
            "bucket_rows_by_variant": {name: trainer.model.text.bucket_rows for name, trainer in trainers.items()},
            "cuts_text_padding": {name: [trainer.model.text.cut_padding]
                                  + [t.model.text.cut_padding for t in trainer.teachers.teachers
                                     if trainer.teachers.mode == "online"] for name, trainer in trainers.items()},
            "without_student_dropout": {
                "cached_step_s": step_s["cached_no_dropout"], "online_step_s": step_s["online_no_dropout"],
                "online_over_cached": step_s["online_no_dropout"] / step_s["cached_no_dropout"]},
            "model_flops": {"student": flops["student"], "teachers": flops["teachers"],
                            "online_over_cached_bound": flops["total"] / flops["student"]},
            "teacher_targets_s": {mode: median(v) for mode, v in targets.items()},
            "cache_build_s": median(cache_build["cut"]),
            "cache_build_full_padding_s": median(cache_build["full_padding"]),
            "cache_videos": len(corpora["train"]),
            "cache_captions": sum(len(c) for c in corpora["train"].captions[ENGLISH]),
            "samples_s": times,
        }


# ---- 3. ranking ----------------------------------------------------------------------------------
def _peak_rss_bytes():
    """This process's peak resident memory. VmHWM belongs to the process's own address space;
    getrusage's ru_maxrss (the fallback) also carries the parent's peak across fork and exec."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _reset_peak_rss():
    """Lower the process's peak-RSS mark to its current RSS (Linux >= 4.0), so that a following
    delta measures the peak of what runs next, not a peak left over from start-up."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def two_pass_ranks(queries, videos, query_video, chunk_size=4096, tie_break="averaging"):
    """The ranking one-pass ranking replaced, kept as this benchmark's comparison: t2v from blocks
    of queries (chunk @ videos.T), v2t from blocks of videos (queries @ chunk.T), with eager
    comparisons, so every score is computed twice."""
    from model.metric import _summarise
    num_q, num_v = len(queries), len(videos)
    t2v = ([], [], [])
    for start in range(0, num_q, chunk_size):
        rows = queries[start:start + chunk_size] @ videos.t()
        gt = rows.gather(1, query_video[start:start + chunk_size, None])
        t2v[0].append((rows > gt).sum(1, dtype=torch.int32).cpu())
        t2v[1].append((rows == gt).sum(1, dtype=torch.int32).cpu())
        t2v[2].append(torch.ones(len(rows), dtype=torch.int32))
    v2t = ([], [], [])
    all_queries = torch.arange(num_q, device=queries.device)
    for start in range(0, num_v, chunk_size):
        end = min(start + chunk_size, num_v)
        cols = queries @ videos[start:end].t()
        inside = (query_video >= start) & (query_video < end)
        q_in, col_in = all_queries[inside], query_video[inside] - start
        own = cols[q_in, col_in]
        best = torch.full((end - start,), float("-inf"), dtype=cols.dtype, device=cols.device)
        best = best.scatter_reduce(0, col_in, own, reduce="amax")
        at_best = torch.zeros(end - start, dtype=torch.int32, device=cols.device)
        at_best = at_best.scatter_add(0, col_in, (own == best[col_in]).int())
        has_query = (at_best > 0).cpu()
        v2t[0].append((cols > best).sum(0, dtype=torch.int32).cpu()[has_query])
        v2t[1].append((cols == best).sum(0, dtype=torch.int32).cpu()[has_query])
        v2t[2].append(at_best.cpu()[has_query])
    return {name: _summarise(*(torch.cat(c) for c in counts), tie_break, None)
            for name, counts in (("t2v", t2v), ("v2t", v2t))}


def products_only(queries, videos, chunk_size=4096):
    """The matrix products of one-pass ranking and nothing else: the floor of its time."""
    for r in range(0, len(queries), chunk_size):
        for c in range(0, len(videos), chunk_size):
            queries[r:r + chunk_size] @ videos[c:c + chunk_size].t()


RANKING_METHODS = ("matrix", "two_pass", "one_pass", "products")


def eval_worker(spec):
    """One ranking measurement in a fresh process: seconds and peak extra memory in bytes."""
    from model.metric import (COMPILE_MIN_SCORES, _fused_tile_counts, retrieval_metrics,
                              retrieval_metrics_from_embeddings)
    n, dim, device = spec["n"], spec["dim"], torch.device(spec["device"])
    gen = torch.Generator(device=device).manual_seed(spec.get("seed", 0))
    # Built in place, so that building leaves no higher memory mark than what it keeps.
    videos = torch.randn(n, dim, generator=gen, device=device)
    videos.div_(videos.norm(dim=1, keepdim=True))
    queries = torch.randn(n, dim, generator=gen, device=device)
    # Noisy copies of the videos: the ground truth usually, but not always, ranks first.
    queries.mul_(spec.get("noise", 0.3)).add_(videos)
    queries.div_(queries.norm(dim=1, keepdim=True))
    query_video = torch.arange(n, device=device)
    chunk, method = spec["chunk_size"], spec["method"]
    rank = {"matrix": lambda q, v, qv: retrieval_metrics(q @ v.t(), qv, chunk_size=chunk),
            "two_pass": lambda q, v, qv: two_pass_ranks(q, v, qv, chunk_size=chunk),
            "one_pass": lambda q, v, qv: retrieval_metrics_from_embeddings(q, v, qv, chunk_size=chunk),
            "products": lambda q, v, qv: products_only(q, v, chunk_size=chunk)}[method]

    def run():
        return rank(queries, videos, query_video)

    rank(queries[:16], videos[:16], query_video[:16])  # one-off initialisation (CUDA context, kernels)
    compile_s = None
    if method == "one_pass" and n * n >= COMPILE_MIN_SCORES:
        # Compiling the fused comparisons is a one-off per process (and cached on disk): once for
        # square tiles and once for the others (torch.compile specialises on equal sizes).
        def compile_counts():
            for cols in (64, 48):
                tile = queries[:64] @ videos[:cols].t()
                _fused_tile_counts(tile, tile[:, 0].clone()[:, None], tile[0].clone()[None])
        compile_s, _ = timed(compile_counts, device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        reset = True
    else:
        reset = _reset_peak_rss()
        before = _peak_rss_bytes()
    seconds, metrics = timed(run, device)
    peak = (torch.cuda.max_memory_allocated(device) if device.type == "cuda" else _peak_rss_bytes()) - before
    return {"seconds": seconds, "peak_bytes": int(peak), "peak_mark_reset": reset, "metrics": metrics,
            "compile_s": compile_s}


def _run_worker(spec):
    out = subprocess.run([sys.executable, "-m", "apps.benchmark", "--eval-worker", json.dumps(spec)],
                         cwd=ROOT, capture_output=True, text=True, check=False)
    if out.returncode:
        raise RuntimeError(f"ranking worker {spec} failed:\n{out.stderr.strip()[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def bench_eval(sizes, device, dim=512, chunk_size=4096, repeats=3, materialise_limit=20_000, log=print):
    """Ranking time and peak memory of N x N sets: one-pass ranking from embeddings against the
    two-pass ranking it replaced, a materialised matrix (up to ``materialise_limit``) and the
    matrix products alone."""
    results = []
    for n in sizes:
        methods = [m for m in RANKING_METHODS if m != "matrix" or n <= materialise_limit]
        reps = repeats if n <= materialise_limit else 1
        runs = {m: [] for m in methods}
        for _ in range(reps):
            for m in methods:
                runs[m].append(_run_worker({"n": n, "dim": dim, "device": str(device), "method": m,
                                            "chunk_size": chunk_size}))
        row = {"n": n, "dim": dim, "chunk_size": chunk_size, "repeats": reps,
               "peak_mark_reset": all(r["peak_mark_reset"] for rs in runs.values() for r in rs),
               "compile_s": runs["one_pass"][0]["compile_s"]}
        for m in methods:
            row[m] = {"seconds": median([r["seconds"] for r in runs[m]]),
                      "peak_mib": median([r["peak_bytes"] for r in runs[m]]) / 2**20,
                      "samples_s": [r["seconds"] for r in runs[m]]}
            if m != "products":
                row[m].update(t2v_R1=runs[m][0]["metrics"]["t2v"]["R1"], v2t_R1=runs[m][0]["metrics"]["v2t"]["R1"])
        ranked = [m for m in methods if m != "products"]
        row["same_metrics"] = all(runs[m][0]["metrics"] == runs["one_pass"][0]["metrics"] for m in ranked)
        row["two_pass_over_one_pass"] = row["two_pass"]["seconds"] / row["one_pass"]["seconds"]
        row["one_pass_over_products"] = row["one_pass"]["seconds"] / row["products"]["seconds"]
        log(f"  ranking N={n}: " + ", ".join(f"{m} {row[m]['seconds']:.2f} s" for m in methods))
        results.append(row)
    return {"device": str(device), "memory": "increase of the peak resident memory (VmHWM) of a fresh process "
                                              "(CPU), or of torch.cuda.max_memory_allocated (GPU)",
            "sizes": results}


# ---- 4. full-size step on a GPU ------------------------------------------------------------------
BASE_SHAPES = {
    # LaBSE student and the reference's three teachers (c2kd-reference §2.1), random weights.
    "student": ("bert", dict(vocab_size=501_153, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                             intermediate_size=3072)),
    "teachers": [
        ("xlmr", dict(vocab_size=250_002, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                      intermediate_size=3072)),
        ("bert", dict(vocab_size=105_879, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                      intermediate_size=3072)),
        ("distilbert", dict(vocab_size=119_547, hidden_size=768, num_hidden_layers=6, num_attention_heads=12,
                            intermediate_size=3072)),
    ],
}


def _param_count(modules):
    return sum(p.numel() for m in modules for p in m.parameters())


def text_forward_flops(encoder, sequences, seq_len):
    """Forward FLOPs of a TextEncoder: 2 per parameter per token it touches. Embedding tables are
    lookups (no FLOPs); the pooler (if the backbone has one), the LayerNorm and the projection
    act once per sequence; the attention score products (a few % at 35 tokens) are left out."""
    backbone = encoder.backbone
    embedding = [m for m in backbone.modules() if isinstance(m, nn.Embedding)]
    pooler = [backbone.pooler] if getattr(backbone, "pooler", None) is not None else []
    per_token = _param_count([backbone]) - _param_count(embedding) - _param_count(pooler)
    per_sequence = _param_count(pooler) + _param_count([encoder.norm, encoder.proj])
    return 2.0 * (per_token * sequences * seq_len + per_sequence * sequences)


def video_forward_flops(video, videos, n_tokens):
    """Forward FLOPs of a VideoEncoder: the input projection and norm on every frame token, the
    transformer blocks on the frames plus CLS, the output projection on CLS only."""
    per_frame = _param_count([video.token_proj, video.norm])
    per_block_token = _param_count(video.blocks)
    return 2.0 * videos * (per_frame * n_tokens + per_block_token * (n_tokens + 1) + _param_count([video.proj]))


def c2kd_step_flops(student, teachers, batch_size, languages, seq_len, n_video_tokens, online,
                    teacher_seq_lens=None, student_buckets=None):
    """Model FLOPs of one C2KD step: forward and backward (3x forward) of the student's text encoder
    over every language and of its video encoder, plus, with online teachers, one forward of each
    teacher's text (English) and video encoders. ``seq_len`` and ``teacher_seq_lens`` (default:
    ``seq_len`` for every teacher) are the text columns each encoder runs; ``student_buckets``
    [(rows, columns)] replaces the student's one batch of ``seq_len`` columns by length buckets."""
    teacher_seq_lens = teacher_seq_lens or [seq_len] * len(teachers)
    student_buckets = student_buckets or [(batch_size * languages, seq_len)]
    student_fwd = (sum(text_forward_flops(student.text, rows, columns) for rows, columns in student_buckets)
                   + video_forward_flops(student.video, batch_size, n_video_tokens))
    teacher_fwd = sum(text_forward_flops(t.text, batch_size, length)
                      + video_forward_flops(t.video, batch_size, n_video_tokens)
                      for t, length in zip(teachers, teacher_seq_lens)) if online else 0.0
    return {"student": 3.0 * student_fwd, "teachers": teacher_fwd, "total": 3.0 * student_fwd + teacher_fwd}


def peak_bf16_flops(device_name):
    for key, flops in PEAK_BF16_FLOPS:
        if key.lower() in device_name.lower():
            return flops
    return None


class SyntheticTeachers:
    """Frozen teachers over a synthetic training set of ``num_items`` items; the cached outputs are
    random unit vectors. ``similarities`` is trainer.teachers.Teachers.similarities itself."""

    def __init__(self, teachers, mode, num_items, dim, device):
        from trainer.teachers import Teachers
        self._impl = Teachers.__new__(Teachers)
        self._impl.teachers, self._impl.mode, self._impl.device = teachers, mode, device
        self._impl.cache = []
        if mode == "cached":
            gen = torch.Generator(device=device).manual_seed(1)
            for _ in teachers:
                self._impl.cache.append({
                    "text": F.normalize(torch.randn(num_items, dim, generator=gen, device=device), dim=1),
                    "video": F.normalize(torch.randn(num_items, dim, generator=gen, device=device), dim=1),
                    "offsets": torch.arange(num_items, device=device),
                    "counts": torch.ones(num_items, dtype=torch.long, device=device)})

    def __len__(self):
        return len(self._impl.teachers)

    def similarities(self, batch):
        return self._impl.similarities(batch)


def synthetic_batch(batch_size, languages, seq_len, n_video_tokens, feature_dim, student_vocab, teacher_vocabs,
                    num_items, seed=0):
    """A batch shaped like the loader's: full-length captions, full-length videos."""
    from trainer.teachers import Teachers
    gen = torch.Generator().manual_seed(seed)

    def tokens(vocab):
        return {"input_ids": torch.randint(5, vocab, (batch_size, seq_len), generator=gen),
                "attention_mask": torch.ones(batch_size, seq_len, dtype=torch.long)}

    text = {"student": {lang: tokens(student_vocab) for lang in languages}}
    for i, vocab in enumerate(teacher_vocabs):
        text[Teachers.input_name(i)] = {ENGLISH: tokens(vocab)}
    video = F.normalize(torch.randn(batch_size, n_video_tokens, feature_dim, generator=gen), dim=2)
    return {"index": torch.randperm(num_items, generator=gen)[:batch_size],
            "caption_index": torch.zeros(batch_size, dtype=torch.long),
            "video": video, "video_mask": torch.ones(batch_size, n_video_tokens, dtype=torch.bool),
            "text": text, "has_caption": {lang: torch.ones(batch_size, dtype=torch.bool) for lang in languages}}


def bench_gpu_step(device, shapes=None, batch_size=64, languages=9, seq_len=35, n_video_tokens=30,
                   feature_dim=512, video_width=512, projection_dim=512, steps=10, warmup=3, peak_flops=None,
                   mixed_precision="bf16"):
    """Trainer.training_step of a full-size C2KD setup with cached and with online teachers.

    Student and online teachers run under the trainer's autocast, as the reference did (§3.1)."""
    from data_loader.dataset import EnglishReading
    from model.model import RetrievalModel, TextEncoder, VideoEncoder
    from parse_config import resolve
    from trainer.build import build_loss
    from trainer.teachers import Teacher
    from trainer.trainer import Trainer

    device = torch.device(device)
    shapes = shapes or BASE_SHAPES
    langs = [ENGLISH] + [f"lang{i}" for i in range(1, languages)]  # synthetic captions: names only
    num_items = max(1000, batch_size)

    def retrieval_model(family, shape):
        with torch.device(device):  # every synthetic caption is full-length: length buckets would cut nothing
            return RetrievalModel(TextEncoder(build_backbone(family, shape), projection_dim, bucket_rows=None),
                                  VideoEncoder(feature_dim, width=video_width, projection_dim=projection_dim))

    torch.manual_seed(0)
    student = retrieval_model(*shapes["student"])
    teachers = [Teacher(f"random-{family}-{i}", retrieval_model(family, shape), None, EnglishReading(teacher=True))
                for i, (family, shape) in enumerate(shapes["teachers"])]
    batch = synthetic_batch(batch_size, langs, seq_len, n_video_tokens, feature_dim,
                            shapes["student"][1]["vocab_size"], [s["vocab_size"] for _, s in shapes["teachers"]],
                            num_items)
    stub = SimpleNamespace(dataset=SimpleNamespace(text_inputs=[SimpleNamespace(languages=langs)]),
                           sampler=SimpleNamespace(local_batch=batch_size))
    trainers = {}
    for mode in ("cached", "online"):
        config = resolve({"stage": "c2kd", "teachers.mode": mode, "trainer.mixed_precision": mixed_precision,
                          "data.batch_size": batch_size, "data.max_words_train": seq_len,
                          "data.n_video_tokens": n_video_tokens, "data.feature_dim": feature_dim,
                          "teachers.checkpoints": [str(t.path) for t in teachers]}, name="gpu-bench")
        loss = build_loss(config, num_teachers=len(teachers)).to(device)
        trainer = Trainer(config, copy.deepcopy(student), loss, stub, stub, device, None)
        trainer.teachers = SyntheticTeachers(teachers, mode, num_items, projection_dim, device)
        trainer.forward.train()
        trainers[mode] = trainer
    del student
    for _ in range(warmup):
        for trainer in trainers.values():
            trainer.training_step(batch)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = interleaved({mode: (lambda t=t: t.training_step(batch)) for mode, t in trainers.items()}, steps, device)
    out = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else str(device),
           "batch_size": batch_size, "languages": len(langs), "seq_len": seq_len, "n_video_tokens": n_video_tokens,
           "autocast": str(trainers["cached"].amp_dtype).replace("torch.", "") if trainers["cached"].amp_dtype else "off",
           "steps": steps, "warmup": warmup,
           "student_params": _param_count([trainers["cached"].model]),
           "teacher_params": [_param_count([t.model]) for t in teachers],
           "peak_flops": peak_flops}
    if device.type == "cuda":
        out["peak_memory_gib_all_trainers"] = torch.cuda.max_memory_allocated(device) / 2**30
    for mode, trainer in trainers.items():
        flops = c2kd_step_flops(trainer.model, [t.model for t in teachers], batch_size, len(langs), seq_len,
                                n_video_tokens, online=mode != "cached")
        step = median(times[mode])
        out[mode] = {"step_s": step, "model_flops": flops["total"], "student_flops": flops["student"],
                     "teacher_flops": flops["teachers"], "achieved_flops_per_s": flops["total"] / step,
                     "mfu": flops["total"] / step / peak_flops if peak_flops else None,
                     "samples_s": times[mode]}
    out["online_over_cached"] = out["online"]["step_s"] / out["cached"]["step_s"]
    return out


# ---- 5. feature extraction -----------------------------------------------------------------------
def bench_extraction(devices, n_videos=4, seconds=4.0, source=(240, 320), source_fps=25, batch_size=32, quick=False):
    """Videos per second of ``data_loader.extract``'s two halves on synthetic videos (``seconds`` long,
    ``source`` height x width at ``source_fps``): decoding and preparing the model inputs in one
    process (a decoding worker), and encoding them on each of ``devices``. Both encoders have the
    published sizes with random weights: CLIP ViT-B/32 (its image processor: 224 x 224) at 1 frame a
    second, and S3D on 32-frame clips at 10 fps, one a second (``quick``: 16-frame clips of 112 x 112)."""
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel

    from data_loader.extract import ClipImageFeatures, S3DClipFeatures, encode_group
    from data_loader.s3d import S3D
    from data_loader.video import synthetic_frames, write_video

    # ViT-B/32's processor (shorter side 224, centre crop 224) and the size load_processor takes from it.
    clip = ClipImageFeatures(model="random CLIP ViT-B/32", **{**ClipImageFeatures.defaults(), "size": 224})
    clip.processor = CLIPImageProcessorPil()
    s3d = S3DClipFeatures(model="random S3D", **{**S3DClipFeatures.defaults(),
                                                   **({"size": 112, "clip_frames": 16} if quick else {})})
    torch.manual_seed(0)
    networks = {"clip": lambda: CLIPModel(CLIPConfig(text_config={"num_hidden_layers": 1})).eval(),
                "s3d": lambda: S3D().eval()}
    out = {"videos": n_videos, "seconds": seconds, "source": f"{source[1]}x{source[0]} at {source_fps} fps",
           "batch_size": batch_size, "encoders": {}}
    with tempfile.TemporaryDirectory() as tmp:
        paths = [write_video(Path(tmp) / f"v{i}.mp4", synthetic_frames(int(seconds * source_fps), *source, seed=i),
                             source_fps) for i in range(n_videos)]
        for name, encoder in (("clip", clip), ("s3d", s3d)):
            started = time.perf_counter()
            prepared = [encoder.prepare(p) for p in paths]
            row = {"settings": encoder.settings(), "units_per_video": sum(map(encoder.units, prepared)) / n_videos,
                   "decode_videos_per_s": n_videos / (time.perf_counter() - started), "encode_videos_per_s": {}}
            network = networks[name]()
            for device in devices:
                encoder.network = network.to(device)
                encode_group(encoder, prepared[:1], batch_size, device)  # warm-up
                _sync(device)
                started = time.perf_counter()
                encode_group(encoder, prepared, batch_size, device)
                _sync(device)
                row["encode_videos_per_s"][str(device)] = n_videos / (time.perf_counter() - started)
            out["encoders"][name] = row
            del network, encoder.network
    return out


# ---- 6. search at scale --------------------------------------------------------------------------
def random_unit_vectors(n, dim, seed, block=65_536):
    """[n, dim] float32 rows drawn isotropically and L2-normalised, built block by block in place."""
    gen = torch.Generator().manual_seed(seed)
    out = torch.empty(n, dim)
    for start in range(0, n, block):
        rows = out[start:start + block]
        rows.normal_(generator=gen)
        rows.div_(rows.norm(dim=1, keepdim=True))
    return out


def recall_at(found, exact):
    """Mean over queries of the share of the exact top k that ``found`` also holds."""
    return statistics.fmean(len({i for i, _ in f} & {i for i, _ in e}) / len(e) for f, e in zip(found, exact))


def bench_search(sizes, dim=512, n_queries=500, n_single=50, nlist=1024, nprobes=(64, 256, 512, 768, 896),
                 k=10, repeats=1, log=print):
    """Build time, queries per second and recall@k of each search method of ``VideoIndex`` on random
    unit vectors. Isotropic data is the hard case for approximate search: a query's neighbours are
    barely closer than any other vector, so the IVF cells hold no locality to exploit."""
    from apps.inference import FaissExact, FaissIVF, TorchExact, VideoIndex
    results = []
    for n in sizes:
        embeddings = random_unit_vectors(n, dim, seed=0)
        queries = random_unit_vectors(n_queries, dim, seed=1)
        ids = range(n)
        indexes, build_s = {}, {}
        for name, method in (("torch", TorchExact()), ("faiss_exact", FaissExact()),
                             ("faiss_ivf", FaissIVF(nlist=min(nlist, n), nprobe=1))):
            index = VideoIndex(ids, embeddings, method)  # its id table is the same for every method: not timed
            build_s[name], indexes[name] = timed(index.build)
        ivf = indexes["faiss_ivf"]
        variants = {"torch": indexes["torch"], "faiss_exact": indexes["faiss_exact"]}
        variants.update({f"ivf_nprobe_{p}": ivf for p in sorted(nprobes) if p <= ivf.method.nlist})

        def search(name, batch):
            if name.startswith("ivf_nprobe_"):
                ivf.method.nprobe = int(name.removeprefix("ivf_nprobe_"))
            if batch:
                return variants[name].search(queries, k)
            return [variants[name].search(q[None], k)[0] for q in queries[:n_single]]

        # Interleaved: each round runs every method on the batch, then on the single queries.
        batch_s, single_s = {name: [] for name in variants}, {name: [] for name in variants}
        found = {}
        for _ in range(repeats):
            for name in variants:
                seconds, found[name] = timed(lambda: search(name, batch=True))
                batch_s[name].append(seconds)
            for name in variants:
                single_s[name].append(timed(lambda: search(name, batch=False))[0])
        rows = {name: {"recall": recall_at(found[name], found["faiss_exact"]),
                       "batch_qps": n_queries / median(batch_s[name]),
                       "single_qps": n_single / median(single_s[name])} for name in variants}
        for name, row in rows.items():
            log(f"  search N={n} {name}: recall@{k} {row['recall']:.3f}, {row['batch_qps']:.0f} queries/s in a "
                f"batch, {row['single_qps']:.1f} one at a time")
        # The fewest cells scanned that reach the target recall.
        best = next((name for name in rows if name.startswith("ivf") and rows[name]["recall"] >= 0.95), None)
        results.append({
            "n": n, "dim": dim, "k": k, "queries": n_queries, "single_queries": n_single, "repeats": repeats,
            "nlist": ivf.method.nlist,
            "build_s": build_s, "methods": rows,
            "ivf_at_recall_0.95": None if best is None else {
                "method": best, "recall": rows[best]["recall"],
                "batch_qps_over_exact": rows[best]["batch_qps"] / rows["faiss_exact"]["batch_qps"],
                "single_qps_over_exact": rows[best]["single_qps"] / rows["faiss_exact"]["single_qps"]}})
    return {"data": "random isotropic unit vectors; queries drawn the same way", "sizes": results}


# ---- driver --------------------------------------------------------------------------------------
def machine_info():
    info = {"platform": platform.platform(), "python": platform.python_version(), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "cuda_device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    try:
        import transformers
        info["transformers"] = transformers.__version__
        info["load_average"] = list(os.getloadavg())
    except (ImportError, OSError):
        pass
    return info


def _sizes(text):
    return [int(s) for s in text.replace("_", "").split(",") if s.strip()]


def build_parser():
    p = argparse.ArgumentParser(description="Throughput benchmarks (data pipeline, C2KD step, ranking, GPU step).")
    p.add_argument("--out", default="benchmark.json", help="JSON file to write")
    p.add_argument("--quick", action="store_true", help="small sizes: a smoke test in seconds")
    p.add_argument("--assets-root", default="cache", help="Multi-Toy and tiny encoders (built if missing)")
    p.add_argument("--device", help="device of the C2KD-step and ranking benchmarks (default: cuda if available)")
    p.add_argument("--data-items", type=int, help="items per data-pipeline epoch (default: the toy training set)")
    p.add_argument("--data-repeats", type=int, help="interleaved epochs per loader")
    p.add_argument("--steps", type=int, help="interleaved C2KD steps per mode")
    p.add_argument("--eval-sizes", help="comma-separated N of the N x N ranking benchmark "
                                         "(default 1000,10000; --quick: 300)")
    p.add_argument("--eval-repeats", type=int, help="interleaved measurements per method and N")
    p.add_argument("--eval-dim", type=int, default=512)
    p.add_argument("--chunk-size", type=int, default=4096, help="rows/columns per block when ranking")
    p.add_argument("--materialise-limit", type=int, default=20_000,
                   help="largest N ranked through a materialised matrix (larger N: from embeddings only)")
    p.add_argument("--gpu-steps", type=int, default=10, help="interleaved full-size steps per mode (CUDA only)")
    p.add_argument("--peak-flops", type=float, help="peak dense bf16 FLOP/s of the GPU, when not detected by name")
    p.add_argument("--threads", type=int,
                   help="torch CPU threads (default: torch's choice, one per core; --quick: 1, which keeps a "
                        "smoke run fast on a busy machine)")
    p.add_argument("--search-sizes", help="comma-separated N of the search benchmark (default 100000,1000000; "
                                           "--quick: 3000)")
    p.add_argument("--search-nlist", type=int, help="IVF cells (default 1024; --quick: 32)")
    p.add_argument("--search-nprobe", help="comma-separated IVF cells scanned per query "
                                           "(default 64,256,512,768,896; --quick: 4,32)")
    p.add_argument("--search-queries", type=int, default=500, help="queries searched in one batch")
    p.add_argument("--search-single", type=int, default=50, help="of which searched one per call")
    p.add_argument("--search-repeats", type=int, default=1, help="interleaved rounds of the search benchmark")
    p.add_argument("--skip", default="", help="comma-separated sections to skip: data,c2kd,eval,gpu,extract,search")
    p.add_argument("--eval-worker", help=argparse.SUPPRESS)
    return p


def run(args, assets=None, log=print):
    threads = args.threads or (1 if args.quick else None)
    if not threads:
        return _run(args, assets, log)
    saved = torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")
    torch.set_num_threads(threads)
    os.environ["OMP_NUM_THREADS"] = str(threads)  # the ranking subprocesses
    try:
        return _run(args, assets, log)
    finally:
        torch.set_num_threads(saved[0])
        if saved[1] is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = saved[1]


def _run(args, assets, log):
    from utils.hub import quiet_transformers
    quiet_transformers()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    quick = args.quick
    if assets is None and not {"data", "c2kd"} <= skip:
        from apps.tiny_encoders import ensure_toy_assets
        assets = ensure_toy_assets(args.assets_root)
    report = {"machine": machine_info(), "quick": quick}
    started = time.perf_counter()
    if "data" not in skip:
        log("data pipeline ...")
        report["data_pipeline"] = bench_data(assets, n_items=args.data_items or (128 if quick else None),
                                             repeats=args.data_repeats or (1 if quick else 3))
    if "c2kd" not in skip:
        log("C2KD training step ...")
        report["c2kd_step"] = bench_c2kd_step(assets, device, steps=args.steps or (2 if quick else 20),
                                              warmup=1 if quick else 2)
    if "eval" not in skip:
        log("ranking ...")
        sizes = _sizes(args.eval_sizes or ("300" if quick else "1000,10000"))
        report["evaluation"] = bench_eval(sizes, device, dim=args.eval_dim, chunk_size=args.chunk_size,
                                          repeats=args.eval_repeats or (1 if quick else 3),
                                          materialise_limit=args.materialise_limit, log=log)
    if "gpu" not in skip:
        if torch.cuda.is_available():
            log("full-size C2KD step on the GPU ...")
            name = torch.cuda.get_device_name(0)
            report["gpu_step"] = bench_gpu_step(torch.device("cuda"), steps=2 if quick else args.gpu_steps,
                                                warmup=1 if quick else 3,
                                                peak_flops=args.peak_flops or peak_bf16_flops(name))
        else:
            report["gpu_step"] = {"skipped": "no CUDA device"}
    if "extract" not in skip:
        log("feature extraction ...")
        devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
        report["extraction"] = (bench_extraction(devices, n_videos=2, seconds=2.0, source=(120, 160), quick=True)
                                if quick else bench_extraction(devices))
    if "search" not in skip:
        log("search at scale ...")
        report["search"] = bench_search(_sizes(args.search_sizes or ("3000" if quick else "100000,1000000")),
                                        n_queries=100 if quick else args.search_queries,
                                        n_single=10 if quick else args.search_single,
                                        nlist=args.search_nlist or (32 if quick else 1024),
                                        nprobes=_sizes(args.search_nprobe or ("4,32" if quick else
                                                                              "64,256,512,768,896")),
                                        repeats=args.search_repeats, log=log)
    report["total_s"] = time.perf_counter() - started
    return report


def _cached_vs_online(step):
    return (f"cached {1e3 * step['cached_step_s']:.1f} ms   online {1e3 * step['online_step_s']:.1f} ms   "
            f"online/cached {step['online_over_cached']:.2f}x")


def format_report(report):
    lines = []
    d = report.get("data_pipeline")
    if d:
        lines.append(f"data pipeline ({d['items']} items, batch {d['batch_size']}, {len(d['languages'])} languages, "
                     f"student + {len(d['tokenizers']['teachers'])} teacher tokenizers)")
        lines.append(f"  project   {d['project_items_per_s']:10.0f} items/s   (pre-tokenization once: "
                     f"{d['project_setup_s']:.2f} s)")
        lines.append(f"  reference {d['reference_items_per_s']:10.0f} items/s   "
                     f"({d['tokenizer_calls_per_item']['reference']} tokenizer calls per item)")
        lines.append(f"  ratio     {d['steady_state_ratio']:.1f}x steady state, "
                     f"{d['one_epoch_with_setup_ratio']:.1f}x for one epoch including setup")
    c = report.get("c2kd_step")
    if c:
        lines.append(f"C2KD training step ({c['device']}, batch {c['batch_size']}, {len(c['languages'])} languages)")
        lines.append(f"  {_cached_vs_online(c)}   (embedding the training set for the cache, once: "
                     f"{c['cache_build_s']:.2f} s; {c['cache_build_full_padding_s']:.2f} s over every text column)")
        f = c["model_flops"]
        lines.append(f"  online teachers in train mode, as the reference ran them: "
                     f"{1e3 * c['online_reference_step_s']:.1f} ms   "
                     f"reference/cached {c['online_reference_over_cached']:.2f}x")
        lines.append(f"  the reference's step (also every text column up to max_words): "
                     f"{1e3 * c['reference_step_s']:.1f} ms   reference/cached {c['reference_over_cached']:.2f}x")
        lines.append(f"  student without dropout: {_cached_vs_online(c['without_student_dropout'])}")
        lengths = c["text_lengths"]
        buckets = ", ".join(f"{rows}x{columns}" for rows, columns in lengths["student_buckets"])
        lines.append(f"  cached step with the student's captions as one batch cut to its longest "
                     f"({lengths['student_one_bucket']} columns): {1e3 * c['cached_one_bucket_step_s']:.1f} ms   "
                     f"{c['one_bucket_over_buckets']:.2f}x the step in length buckets (rows x columns: {buckets})")
        lines.append(f"  ... and over all {lengths['max_words']} text columns: "
                     f"{1e3 * c['cached_full_padding_step_s']:.1f} ms   {c['full_padding_over_one_bucket']:.2f}x one batch cut")
        lines.append(f"  model FLOPs: student {f['student'] / 1e9:.2f} G, teachers {f['teachers'] / 1e9:.2f} G, "
                     f"bound on online/cached {f['online_over_cached_bound']:.2f}x")
    e = report.get("evaluation")
    if e:
        lines.append(f"ranking N x N ({e['device']})")
        for row in e["sizes"]:
            parts = [f"{m} {row[m]['seconds']:.2f} s, {row[m]['peak_mib']:.0f} MiB" for m in RANKING_METHODS if m in row]
            lines.append(f"  N={row['n']:<7} " + "   ".join(parts))
            lines.append(f"    two-pass/one-pass {row['two_pass_over_one_pass']:.2f}x   one-pass/products "
                         f"{row['one_pass_over_products']:.2f}x   identical metrics: {row['same_metrics']}   "
                         + (f"   (compiling the fused comparisons, once: {row['compile_s']:.1f} s)" if row["compile_s"] else ""))
    s = report.get("search")
    if s:
        lines.append(f"search at scale ({s['data']})")
        for row in s["sizes"]:
            build = ", ".join(f"{name} {seconds:.1f} s" for name, seconds in row["build_s"].items())
            lines.append(f"  N={row['n']:<8} build: {build}")
            for name, m in row["methods"].items():
                lines.append(f"    {name:16} recall@{row['k']} {m['recall']:.3f}   {m['batch_qps']:9.1f} queries/s "
                             f"in a batch of {row['queries']}   {m['single_qps']:8.1f} one at a time")
            best = row["ivf_at_recall_0.95"]
            lines.append("    IVF at recall >= 0.95: " + (
                f"{best['method']}, {best['batch_qps_over_exact']:.2f}x exact FAISS in a batch, "
                f"{best['single_qps_over_exact']:.2f}x one at a time" if best else "not reached"))
    g = report.get("gpu_step")
    if g:
        if "skipped" in g:
            lines.append(f"GPU step: skipped: {g['skipped'].removeprefix('skipped: ')}")
        else:
            lines.append(f"GPU step ({g['device']}, {g['autocast']})")
            for m in ("cached", "online"):
                mfu = f"{100 * g[m]['mfu']:.1f}%" if g[m]["mfu"] else "n/a"
                lines.append(f"  {m:7} {1e3 * g[m]['step_s']:.1f} ms   MFU {mfu}")
            lines.append(f"  online/cached {g['online_over_cached']:.2f}x")
    x = report.get("extraction")
    if x:
        lines.append(f"feature extraction ({x['videos']} videos of {x['seconds']:g} s, {x['source']}; videos/s)")
        for name, row in x["encoders"].items():
            encode = "   ".join(f"encode {device} {v:.2f}" for device, v in row["encode_videos_per_s"].items())
            lines.append(f"  {name:4} decode {row['decode_videos_per_s']:.2f} (one process)   {encode}   "
                         f"({row['units_per_video']:g} inputs per video)")
    return "\n".join(lines)


def main(argv=None, assets=None):
    args = build_parser().parse_args(argv)
    if args.eval_worker:
        print(json.dumps(eval_worker(json.loads(args.eval_worker))))
        return 0
    report = {"command": " ".join(["python -m apps.benchmark", *(sys.argv[1:] if argv is None else argv)]),
              **run(args, assets=assets)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(format_report(report))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
