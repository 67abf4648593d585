"""Section 4, on a CUDA device: a full-size C2KD training step (random weights), cached and online."""
import copy
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from utils.benchmark.flops import c2kd_step_flops, param_count
from utils.benchmark.timing import interleaved, median
from data_loader.corpus import ENGLISH


BASE_SHAPES = {
    # LaBSE student and the reference's three teachers (docs/reference.md §2.1), random weights.
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


def synthetic_teachers(teachers, mode, num_items, dim, device):
    """The trainer's teachers of ``mode`` over a synthetic training set of ``num_items`` items, one
    caption each; cached outputs are random unit vectors."""
    from trainer.teachers import CachedTeachers, OnlineTeachers
    if mode == "online":
        return OnlineTeachers(teachers)
    gen = torch.Generator(device=device).manual_seed(1)
    return CachedTeachers([{"text": F.normalize(torch.randn(num_items, dim, generator=gen, device=device), dim=1),
                            "video": F.normalize(torch.randn(num_items, dim, generator=gen, device=device), dim=1),
                            "offsets": torch.arange(num_items, device=device),
                            "counts": torch.ones(num_items, dtype=torch.long, device=device)} for _ in teachers])


def synthetic_batch(batch_size, languages, seq_len, n_video_tokens, feature_dim, student_vocab, teacher_vocabs,
                    num_items, seed=0):
    """A batch shaped like the loader's: full-length captions, full-length videos."""
    from data_loader.batch import STUDENT, Batch, Tokens
    from trainer.teachers import OnlineTeachers
    gen = torch.Generator().manual_seed(seed)

    def tokens(vocab):
        return Tokens(torch.randint(5, vocab, (batch_size, seq_len), generator=gen),
                      torch.ones(batch_size, seq_len, dtype=torch.long))

    text = {STUDENT: {lang: tokens(student_vocab) for lang in languages}}
    for i, vocab in enumerate(teacher_vocabs):
        text[OnlineTeachers.input_name(i)] = {ENGLISH: tokens(vocab)}
    video = F.normalize(torch.randn(batch_size, n_video_tokens, feature_dim, generator=gen), dim=2)
    return Batch(index=torch.randperm(num_items, generator=gen)[:batch_size],
                 caption_index=torch.zeros(batch_size, dtype=torch.long),
                 video=video, video_mask=torch.ones(batch_size, n_video_tokens, dtype=torch.bool),
                 text=text, has_caption={lang: torch.ones(batch_size, dtype=torch.bool) for lang in languages})


def bench_gpu_step(device, shapes=None, batch_size=64, languages=9, seq_len=35, n_video_tokens=30,
                   feature_dim=512, video_width=512, projection_dim=512, steps=10, warmup=3, peak_flops=None,
                   mixed_precision="bf16"):
    """Trainer.training_step of a full-size C2KD setup with cached and with online teachers.

    Student and online teachers run under the trainer's autocast, as the reference did (docs/reference.md §3.1)."""
    from data_loader.dataset import EnglishReading
    from model.model import RetrievalModel, TextEncoder, VideoEncoder
    from parse_config import resolve
    from trainer.build import build_loss, build_optimizer
    from trainer.teachers import Teacher
    from trainer.trainer import Trainer, TrainerSettings
    from utils.tiny_encoders import build_backbone  # transformers' model classes: 2 s for every ranking worker

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
    loader = SimpleNamespace(local_batch=batch_size)  # the trainer steps on the batch above only
    trainers = {}
    for mode in ("cached", "online"):
        config = resolve({"stage": "c2kd", "teachers.mode": mode, "trainer.mixed_precision": mixed_precision,
                          "data.batch_size": batch_size, "data.max_words_train": seq_len,
                          "data.n_video_tokens": n_video_tokens, "data.feature_dim": feature_dim,
                          "teachers.checkpoints": [str(t.path) for t in teachers]}, name="gpu-bench")
        loss = build_loss(config, num_teachers=len(teachers)).to(device)
        model = copy.deepcopy(student)
        trainer = Trainer(TrainerSettings.of(config), model, loss, *build_optimizer(config, model, loss), loader,
                          None, device, teachers=synthetic_teachers(teachers, mode, num_items, projection_dim, device))
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
           "student_params": param_count([trainers["cached"].model]),
           "teacher_params": [param_count([t.model]) for t in teachers],
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

