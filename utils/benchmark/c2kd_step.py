"""Section 2, C2KD training step on Multi-Toy: cached against online teachers, and the reference's step."""
import copy
import tempfile
from pathlib import Path

import torch

from utils.benchmark import ROOT, TEACHER_ENCODERS
from utils.benchmark.flops import c2kd_step_flops
from utils.benchmark.timing import interleaved, median
from data_loader.corpus import ENGLISH


def make_random_teachers(assets, folder, base_flat):
    """Checkpoints of three randomly initialised toy teachers (one per teacher encoder)."""
    from model.model import build_model
    from parse_config import resolve
    from common.checkpoint import save_checkpoint

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
    from model.model import load_tokenizer, model_from_config
    from parse_config import resolve
    from trainer.build import build_loaders, build_teachers, load_corpora
    from trainer.state import seed_everything
    from trainer.teachers import TeacherCache

    with tempfile.TemporaryDirectory(prefix="c2kd-bench-") as folder:
        flat = _toy_c2kd_flat(assets, folder)
        flat["teachers.checkpoints"] = make_random_teachers(assets, folder, flat)
        configs = {mode: resolve({**flat, "teachers.mode": mode}, name="c2kd") for mode in ("cached", "online")}
        seed_everything(0)
        corpora = load_corpora(configs["online"])
        tokenizer = load_tokenizer(configs["online"]["model"]["text_encoder"])
        teachers = {mode: build_teachers(configs[mode], corpora["train"], device, tokenizer)
                    for mode in ("online", "cached")}
        train_mode_teachers = _train_mode_teachers(configs["online"], corpora["train"], device, tokenizer)
        cache = TeacherCache(corpora["train"], configs["cached"], tokenizer)
        cache_build = _time_cache_build(cache, teachers["online"].teachers, 3 if steps > 2 else 1, device)
        model, _ = model_from_config(configs["online"], tokenizer=tokenizer)
        # The online loader also carries the teachers' tokens; the cached step ignores them.
        train_loader, eval_loader = build_loaders(configs["online"], corpora, tokenizer,
                                                  extra_inputs=teachers["online"].text_inputs)
        train_loader.set_epoch(0)
        batch = next(iter(train_loader))
        rows = model.text.bucket_rows
        trainers = _variant_trainers(configs, model, {**teachers, **train_mode_teachers},
                                     (train_loader, eval_loader), device)
        for _ in range(warmup):
            for trainer in trainers.values():
                trainer.training_step(batch)
        times = interleaved({name: (lambda t=t: t.training_step(batch)) for name, t in trainers.items()},
                            steps, device)
        batch_dev = batch.to(device)
        targets = interleaved({mode: (lambda t=teachers[mode]: t.similarities(batch_dev)) for mode in teachers},
                              steps, device)
        step_s = {name: median(v) for name, v in times.items()}
        cached, online = step_s["cached"], step_s["online"]
        cfg = configs["cached"]
        lengths = _text_lengths(batch, rows, cfg["data"]["max_words_train"], len(teachers["online"]))
        flops = c2kd_step_flops(model, [t.model for t in teachers["online"].teachers], cfg["data"]["batch_size"],
                                len(batch.student), lengths["student_one_bucket"],
                                cfg["data"]["n_video_tokens"], online=True, teacher_seq_lens=lengths["teachers"],
                                student_buckets=lengths["student_buckets"])
        return {
            "device": str(device), "steps": steps, "warmup": warmup,
            "batch_size": cfg["data"]["batch_size"], "languages": list(batch.student),
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
            **_variant_settings(trainers),
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


def _train_mode_teachers(config, corpus, device, tokenizer):
    """The reference's design: online teachers left in train mode, so their dropout runs too
    (docs/reference.md §3.1; this project puts teachers in eval mode). Timed, never trained with.
    "reference" also runs every text column up to max_words, as the reference padded (docs/reference.md §1.3)."""
    from trainer.build import build_teachers
    train_mode_teachers = {}
    for name, cut_padding in (("online_reference", True), ("reference", False)):
        train_mode_teachers[name] = build_teachers(config, corpus, device, tokenizer)
        for teacher in train_mode_teachers[name].teachers:
            teacher.model.train()
            teacher.model.text.cut_padding = cut_padding
    return train_mode_teachers


def _time_cache_build(cache, teachers, repeats, device):
    """The work of the one-off cache build: every teacher embeds the training set (timed on
    later passes, with the teachers loaded; loading and writing the file are left out), with
    the padding cut and, as the reference padded, over every text column. The teachers are left
    cutting the padding."""
    def set_cut_padding(cut_padding):
        for t in teachers:
            t.model.text.cut_padding = cut_padding

    def build_cache(cut_padding):
        set_cut_padding(cut_padding)
        for t in teachers:
            cache.embed_training_set(t)

    times = interleaved({"cut": lambda: build_cache(True), "full_padding": lambda: build_cache(False)},
                        repeats, device)
    set_cut_padding(True)
    return times


def _variant_trainers(configs, model, teachers, loaders, device):
    """One Trainer per variant of the step, each on its own copy of ``model``; ``teachers`` by mode
    ("cached", "online") and by reference-style variant ("online_reference", "reference").

    "<mode>" trains as usual; "<mode>_no_dropout" runs the same step with the student in eval
    mode, to show how much of the student's step is dropout; "cached_one_bucket" runs the
    student's captions as one batch cut to the longest, and "cached_full_padding" every text
    column (diagnostics, not training modes)."""
    from trainer.build import build_loss, build_trainer

    # name: (mode, teachers, student in train mode, student cuts padding, student's bucket rows)
    rows = model.text.bucket_rows
    variants = {"cached": ("cached", teachers["cached"], True, True, rows),
                "cached_no_dropout": ("cached", teachers["cached"], False, True, rows),
                "cached_one_bucket": ("cached", teachers["cached"], True, True, None),
                "cached_full_padding": ("cached", teachers["cached"], True, False, None),
                "online": ("online", teachers["online"], True, True, rows),
                "online_no_dropout": ("online", teachers["online"], False, True, rows),
                "online_reference": ("online", teachers["online_reference"], True, True, rows),
                "reference": ("online", teachers["reference"], True, False, None)}
    train_loader, eval_loader = loaders
    trainers = {}
    for variant, (mode, variant_teachers, training, cut_padding, bucket_rows) in variants.items():
        loss = build_loss(configs[mode], num_teachers=len(variant_teachers)).to(device)
        trainers[variant] = build_trainer(configs[mode], copy.deepcopy(model).to(device), loss, train_loader,
                                          eval_loader, device, teachers=variant_teachers)
        trainers[variant].forward.train(training)
        trainers[variant].model.text.cut_padding = cut_padding
        trainers[variant].model.text.bucket_rows = bucket_rows
    return trainers


def _text_lengths(batch, rows, max_words, num_teachers):
    """Text columns the steps run: the student's captions of all languages, in buckets of
    similar length (rows, columns) or as one batch, and each teacher's English."""
    from model.model import length_buckets, row_lengths, used_length
    from trainer.teachers import OnlineTeachers

    student_masks = torch.cat([t.attention_mask for t in batch.student.values()])
    buckets = [(len(student_masks[r]), n) for r, n in length_buckets(row_lengths(student_masks), rows)]
    return {"max_words": max_words, "student_buckets": buckets,
            "student_one_bucket": used_length(student_masks),
            "teachers": [used_length(batch.text[OnlineTeachers.input_name(i)][ENGLISH].attention_mask)
                         for i in range(num_teachers)]}


def _variant_settings(trainers):
    """How each variant ran its step, read back from its trainer."""
    from trainer.teachers import OnlineTeachers
    online = {name: trainer for name, trainer in trainers.items() if isinstance(trainer.teachers, OnlineTeachers)}
    return {
        # Whether each online variant's teachers ran in train mode (dropout on) during its steps.
        "teachers_in_train_mode": {name: all(t.model.training for t in trainer.teachers.teachers)
                                   for name, trainer in online.items()},
        # Whether each variant's text encoders (student, then online teachers) cut padding columns,
        # and the student's rows per length bucket (None: one bucket).
        "bucket_rows_by_variant": {name: trainer.model.text.bucket_rows for name, trainer in trainers.items()},
        "cuts_text_padding": {name: [trainer.model.text.cut_padding]
                              + ([t.model.text.cut_padding for t in trainer.teachers.teachers] if name in online else [])
                              for name, trainer in trainers.items()},
    }
