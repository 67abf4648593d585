"""Throughput benchmarks, measured as ratios within one run on one machine.

    python -m utils.benchmark [--out benchmark.json] [--quick] [--eval-sizes 1000,10000]
                              [--search-sizes 100000,1000000] [--skip data,c2kd,eval,gpu,extract,search]

One module per section:

1. ``data``, data pipeline: items per second of this project's loader (captions tokenized once per
   tokenizer, docs/reference.md §1.3 fixed) against a loader that tokenizes every caption of every
   language with every tokenizer on each access, as the reference did; the one-off
   pre-tokenization is reported separately and folded into a one-epoch ratio.
2. ``c2kd_step``, C2KD training step (``Trainer.training_step``) with cached against online teachers, on
   Multi-Toy with the tiny encoders and three randomly initialised teachers; also online teachers
   left in train mode as the reference ran them, with and without the padding cut (the reference
   ran every text column up to max_words), and, as diagnostics, the step with the student's
   dropout off, the cached step without the padding cut, and the counted model FLOPs (``flops``).
3. ``ranking``, ranking N x N: ``retrieval_metrics_from_embeddings`` (one pass: each score computed once)
   against the two-pass ranking it replaced, ``retrieval_metrics`` on a materialised matrix and
   the matrix products alone (the floor); time and peak memory, one subprocess per measurement.
4. ``gpu``, on a CUDA device only: a training step of a LaBSE-shaped student with three base-sized
   teachers (random weights), cached and online, bf16 autocast, with model FLOPs utilisation.
5. ``extraction``, feature extraction (``data_loader.extract``): videos per second decoded and prepared by one
   decoding process, and encoded by CLIP ViT-B/32 and by S3D (random weights, full size) on the
   CPU and, when there is one, on the GPU.
6. ``search``, search at scale: ``VideoIndex`` over N random 512-d unit vectors, searched by torch brute
   force, exact FAISS and FAISS IVF at several ``nprobe``: build time, queries per second (in one
   batch, and one query per call as a search page asks) and recall@10 against exact search.

``cli`` runs the sections and writes the JSON report, ``summary`` prints its short table.
Timings of two variants are interleaved (A B A B ...) and medians are reported (``timing``), so
that a machine shared with other work still gives comparable ratios.
"""
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TEACHER_ENCODERS = ("xlmr-tiny", "mbert-tiny", "distiluse-tiny")
