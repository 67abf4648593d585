"""English-input teachers for C2KD (docs/reference.md §3.1, §5).

A teacher is an ordinary checkpoint of this project, usually trained with the translate-train
stage, with its own text encoder and tokenizer. During C2KD it is frozen and in eval mode, reads
the **English** caption of each item as it was trained to (its checkpoint's ``model.role`` and
``data.clean_english``: regex-cleaned where its dataset's teachers read cleaned English, as the
reference's MSR-VTT, VATEX and YouCook2 teachers; as written for RUDDER, docs/reference.md §1.3), and its
text-video similarity matrix over the batch is the distillation target.

Two kinds of teachers give the same targets in fp32; ``teachers.mode`` picks one (trainer/build.py).
``CachedTeachers`` (default) use the embeddings of every (video, English caption) pair of the
training set, computed once before training and stored on disk by ``TeacherCache``, keyed by the
teacher checkpoint and a hash of the English captions and frames it embeds; a batch's teacher
matrix is then a product of cached rows. ``OnlineTeachers`` run the teachers on every step, as the
reference did. Both give ``similarities(batch)``, the ``text_inputs`` the batch must carry for
them, and ``len()``, the number of teachers.
"""
import hashlib
import json
from pathlib import Path

import numpy as np
import torch

from data_loader.corpus import ENGLISH
from data_loader.batch import POOL_MASK
from data_loader.dataset import EnglishReading, TextInput, TokenTable
from model.loss import cosine_sim, similarity, stage_loss
from model.model import model_from_checkpoint
from parse_config import upgrade_saved_config
from common.checkpoint import CheckpointError, atomic_save, load_checkpoint
from common.distributed import gather, gather_objects, gather_to_main, on_main, rank, world_size

CACHE_VERSION = 1


class Teacher:
    def __init__(self, path, model, tokenizer, english, pool_with_student_mask=False):
        self.path, self.model, self.tokenizer = Path(path), model, tokenizer
        # Converted reference teachers pooled their states with the student tokenizer's mask
        # of the raw English caption (docs/reference.md §2.3); they keep doing so to reproduce their targets.
        self.pool_with_student_mask = pool_with_student_mask
        # English is read as the teacher was trained to read it (model.role, data.clean_english).
        self.english = english
        self.model.eval().requires_grad_(False)


def load_teacher(path, feature_dim, device):
    """A frozen teacher from a checkpoint; every failure names the file."""
    state = load_checkpoint(path, map_location="cpu")
    config = upgrade_saved_config(state["config"])
    if stage_loss(config["stage"]).distils:  # C2KD distils from English-input translate-train models
        raise CheckpointError(f"{path}: a C2KD student, not a teacher (config key 'teachers.checkpoints' takes "
                              "translate-train runs, or converted reference teachers)")
    teacher_dim = config["data"]["feature_dim"]
    if teacher_dim != feature_dim:
        raise CheckpointError(f"{path}: teacher was trained on {teacher_dim}-d video features, "
                              f"but config key 'data.feature_dim' is {feature_dim}")
    model, tokenizer = model_from_checkpoint(config, state, path)
    return Teacher(path, model.to(device), tokenizer, EnglishReading.of(config),
                   config["model"]["pool_with_student_mask"])


class OnlineTeachers:
    """Teachers run on every step, on the English captions the batch carries for them."""

    def __init__(self, teachers, student_tokenizer=None):
        self.teachers = teachers
        self.text_inputs = [TextInput(self.input_name(i), t.tokenizer, [ENGLISH], t.english)
                            for i, t in enumerate(teachers)]
        if any(t.pool_with_student_mask for t in teachers):
            # The student tokenizer's mask of the raw English caption (docs/reference.md §2.3), as the cache pools
            # with, and not a teacher's English, which may be cleaned or come from another field.
            self.text_inputs.append(TextInput(POOL_MASK, student_tokenizer, [ENGLISH]))

    def __len__(self):
        return len(self.teachers)

    @staticmethod
    def input_name(i):
        """The batch's text key of teacher ``i``."""
        return f"teacher{i}"

    @torch.no_grad()
    def similarities(self, batch):
        """One float32 [B, B] matrix per teacher: English captions of the batch against its videos.
        Under torch.distributed, B is the global batch: the targets of the whole batch, on every rank.
        The teachers embed under the caller's autocast (as the reference's did); the products are
        float32, so half precision rounds no target."""
        sims = []
        for i, t in enumerate(self.teachers):
            pool = batch.text[POOL_MASK][ENGLISH].attention_mask if t.pool_with_student_mask else None
            text = t.model.encode_text(batch.text[self.input_name(i)][ENGLISH], pool_mask=pool)
            video = t.model.encode_video(batch.video, batch.video_mask)
            sims.append(cosine_sim(gather(text), gather(video)))
        return sims


class CachedTeachers:
    """Teachers whose outputs on the training set were computed once (``TeacherCache``)."""
    text_inputs = ()  # the batch carries no text for them

    def __init__(self, cache):
        """``cache``: per teacher, normalised fp32 embeddings of the training set on the training
        device (a batch's targets are then two gathers and a matmul): ``text`` [captions, P] in
        caption order, ``video`` [videos, P], and per video the ``offsets`` of its captions' rows
        and their ``counts``."""
        self.cache = cache

    @classmethod
    def build(cls, teachers, corpus, config, device, student_tokenizer):
        """The cached outputs of ``teachers`` on the training ``corpus``, computed first if needed."""
        store = TeacherCache(corpus, config, student_tokenizer)
        return cls([{k: v.to(device) for k, v in store.outputs(t).items()} for t in teachers])

    def __len__(self):
        return len(self.cache)

    @torch.no_grad()
    def similarities(self, batch):
        """One float32 [B, B] matrix per teacher: English captions of the batch against its videos.
        Under torch.distributed, B is the global batch: the targets of the whole batch, on every rank."""
        index, caption = gather(torch.stack([batch.index, batch.caption_index], dim=1)).unbind(1)
        sims = []
        for cache in self.cache:
            # An item without an English caption (count 0) points at its own offset; the loss
            # leaves it out of distillation (RowMasks.teacher).
            rows = cache["offsets"][index] + torch.minimum(caption, cache["counts"][index] - 1).clamp(min=0)
            rows = rows.clamp(max=len(cache["text"]) - 1)
            sims.append(similarity(cache["text"][rows], cache["video"][index]))  # rows are normalised
        return sims


class TeacherCache:
    """Teachers' outputs on the training set, stored under ``teachers.cache_dir``."""

    def __init__(self, corpus, config, student_tokenizer):
        self.corpus, self.config, self.student_tokenizer = corpus, config, student_tokenizer
        self.max_words = config["data"]["max_words_train"]
        # What every teacher embeds, hashed once for the cache keys.
        self.data_digest = data_digest(corpus, config["data"]["n_video_tokens"])

    def key(self, teacher):
        st = teacher.path.stat()
        # Everything that shapes what the teacher embeds: the checkpoint, the English captions and
        # video frames themselves (so a data file rewritten in place, another layout, feature key
        # or caption fallback all give another key), and how captions are read.
        spec = {"version": CACHE_VERSION, "teacher": [str(teacher.path.resolve()), st.st_size, st.st_mtime_ns],
                "data": self.data_digest,
                "n_video_tokens": self.config["data"]["n_video_tokens"],
                "max_words": self.max_words, "english": [teacher.english.teacher, teacher.english.clean],
                "pool_mask": self.config["model"]["text_encoder"] if teacher.pool_with_student_mask else "own"}
        return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:24]

    def outputs(self, teacher):
        """Load the cache of ``teacher``, computing it first if needed. Under torch.distributed every
        rank embeds a contiguous share of the training set and rank 0 joins the shares and writes the file."""
        path = Path(self.config["teachers"]["cache_dir"]) / f"{self.key(teacher)}.pt"
        cache = None

        def load():
            nonlocal cache
            cache = _load_cache(path)
            if cache is not None:
                print(f"teacher outputs: reusing {path}")
            return cache is not None

        if not on_main(load):
            shares = gather_to_main(self.embed_training_set(teacher, share=(rank(), world_size())))

            def write():
                nonlocal cache
                counts = torch.tensor([len(caps) for caps in teacher.english.captions(self.corpus)], dtype=torch.long)
                cache = {"text": torch.cat([s["text"] for s in shares]),
                         "video": torch.cat([s["video"] for s in shares]),
                         "offsets": torch.cumsum(counts, 0) - counts, "counts": counts}
                atomic_save(cache, path)
                print(f"teacher outputs: wrote {path}")

            on_main(write)
        if cache is None:  # the other ranks read what rank 0 wrote
            cache = _load_cache(path)
        unread = [r for r, ok in enumerate(gather_objects(cache is not None)) if not ok]
        if unread:  # raised on every rank, so that none waits for the others
            raise CheckpointError(f"{path}: cached teacher outputs could not be read back on rank(s) "
                                  f"{', '.join(map(str, unread))} (rank 0 writes them; under several nodes "
                                  f"'teachers.cache_dir' must be a folder every node reads)")
        return cache

    @torch.no_grad()
    def embed_training_set(self, teacher, batch_size=256, share=(0, 1)):
        """Normalised fp32 embeddings of the (video, English caption) pairs of the training set:
        ``text`` [captions, P] in caption order and ``video`` [videos, P]. ``share = (k, n)``: only
        the k-th of n contiguous parts of the captions and of the videos, each tokenized and
        embedded by one rank."""
        english = teacher.english.captions(self.corpus)
        captions = [c for caps in english for c in caps]
        rows = _part(len(captions), *share)
        mine = [[c] for c in captions[rows.start:rows.stop]]
        table = TokenTable(mine, teacher.tokenizer, self.max_words, clean=teacher.english.clean)
        pool_mask = None
        if teacher.pool_with_student_mask:
            # The student tokenizer's mask of the student's English caption of the same row (docs/reference.md §2.3).
            student = [[c] for c in _row_aligned(self.corpus.captions[ENGLISH], english)[rows.start:rows.stop]]
            pool_mask = TokenTable(student, self.student_tokenizer, self.max_words, clean=False).attention_mask
        show = share[0] == 0
        texts = teacher.model.embed_texts(table.input_ids, table.attention_mask, pool_mask, batch_size, progress=show)
        videos = _part(len(self.corpus), *share)
        return {"text": texts,
                "video": teacher.model.embed_videos(self.corpus.features[videos.start:videos.stop],
                                                    self.config["data"]["n_video_tokens"], batch_size, progress=show)}


def data_digest(corpus, n_video_tokens):
    """Hash of what a teacher embeds from ``corpus``: each item's English captions (the students' and
    the teachers' own, where the file keeps them apart) and its first ``n_video_tokens`` frames."""
    h = hashlib.blake2b(digest_size=16)
    teacher_english = corpus.teacher_english or [None] * len(corpus)
    for captions, teacher, frames in zip(corpus.captions[ENGLISH], teacher_english, corpus.features):
        frames = np.ascontiguousarray(frames[:n_video_tokens], dtype=np.float32)
        h.update(json.dumps([captions, teacher, frames.shape]).encode())
        h.update(frames.tobytes())
    return h.hexdigest()


def _row_aligned(student, teacher):
    """For every caption of ``teacher`` (per item lists), the student's caption of the same item and
    index (its last one if it has fewer, "" if none): one row per teacher caption."""
    return [mine[min(k, len(mine) - 1)] if mine else "" for mine, theirs in zip(student, teacher)
            for k in range(len(theirs))]


def _part(n, k, parts):
    """The k-th of ``parts`` contiguous, nearly equal ranges of ``range(n)``."""
    size = -(-n // parts)
    return range(min(n, k * size), min(n, (k + 1) * size))


def _load_cache(path):
    """The cache at ``path``, or None when it is missing or damaged (then it is recomputed, never trusted)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        return None
