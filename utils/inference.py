"""Inference from a trained checkpoint: embed texts and videos, index a collection, search it.

    retriever = Retriever.from_checkpoint("runs/toy/translate_train/demo/latest.pt")
    index = retriever.build_index(corpus.ids, corpus.features)   # encode the collection once
    index.save("videos.safetensors")                             # ... and reuse it later
    retriever.search("a person cuts an onion", VideoIndex.load("videos.safetensors"), top=5)

An index searches by brute force in torch (``TorchExact``, the reference) unless built with a FAISS
method: ``FaissExact`` (the same ranking) or ``FaissIVF`` (approximate, for large collections), e.g.
``retriever.build_index(ids, features, method=FaissIVF(nlist=4096, nprobe=2048))``; check its
``nprobe`` against ``TorchExact`` on your own collection (docs/benchmark.md).

Texts go through the checkpoint's own tokenizer (any language it can read, truncated to
``data.max_words_eval`` tokens), as typed, or regex-cleaned when the checkpoint is an English-input
teacher of a dataset whose teachers read cleaned English (``model.role``, ``data.clean_english``): a
query to such a teacher is taken as English and read as its English captions were (its evaluation read other languages raw); videos through the data
layer's ``video_tokens`` (the first ``data.n_video_tokens`` frames, each L2-normalised). Embeddings are L2-normalised, so a score is
the cosine similarity that evaluation ranks by.
"""
import hashlib
import html
import json
import os
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from data_loader.corpus import ENGLISH, check_items, is_safe_path
from data_loader.dataset import EnglishReading, clean_caption
from data_loader.readers import PICKLE_LAYOUTS, SplitNotInFile, read_corpus
from data_loader.safe_pickle import load_pickle
from model.model import load_tokenizer, model_from_checkpoint
from parse_config import upgrade_saved_config
from common.checkpoint import load_checkpoint
from common.errors import UserError, first_line

INDEX_FORMAT = "c2kd-video-index"


class InferenceError(UserError, ValueError):
    """An input to inference is invalid (empty query, unknown id, wrong feature size, bad index)."""


def _faiss():
    """faiss, imported when an index asks for it: the torch search needs no faiss."""
    try:
        import faiss
    except ImportError:
        raise InferenceError("this index needs faiss: pip install faiss-cpu (or a faiss GPU build)") from None
    return faiss


@dataclass
class TorchExact:
    """Every score, as a matrix product in torch: the reference the FAISS methods are measured
    against. ``block_scores`` bounds the scores held at once (queries are taken in blocks)."""
    block_scores: int = 2 ** 26

    def build(self, embeddings):
        return _TorchSearch(embeddings, self.block_scores)


class _TorchSearch:
    def __init__(self, embeddings, block_scores):
        self.embeddings, self.rows = embeddings, max(1, block_scores // max(1, len(embeddings)))

    def search(self, queries, k):
        best = [torch.topk(block @ self.embeddings.T, k) for block in queries.split(self.rows)]
        return torch.cat([b.values for b in best]), torch.cat([b.indices for b in best])


class _FaissMethod:
    """A FAISS index over the embeddings, written to a file of its own by ``VideoIndex.save``."""

    def build(self, embeddings):
        faiss = _faiss()
        vectors = embeddings.numpy()
        index = self.make(faiss, vectors)
        index.add(vectors)
        return _FaissSearch(self, index)

    def read(self, path, sha256):
        """The index in ``path``, which must be the file whose SHA-256 the safetensors file records:
        a FAISS file of another collection (or an older save) would rank silently wrong."""
        faiss = _faiss()
        if not path.is_file():
            raise InferenceError(f"{path}: FAISS index file not found; save the index again")
        if file_sha256(path) != sha256:
            raise InferenceError(f"{path}: not the FAISS index saved with these embeddings (its SHA-256 differs "
                                 "from the one the safetensors file records); save the index again")
        try:
            index = faiss.read_index(str(path))
        except RuntimeError as e:
            raise InferenceError(f"{path}: not a readable FAISS index ({first_line(e)})") from None
        return _FaissSearch(self, index)

    def tune(self, space, index):
        """Set the query-time parameters on ``index`` (through a faiss ParameterSpace) before a search."""


class _FaissSearch:
    """A built FAISS index, on every GPU that faiss sees (a faiss GPU build on a GPU machine: it
    has GPU versions of the flat and IVF indexes), else on the CPU."""

    def __init__(self, method, index):
        faiss = _faiss()
        self.method, self.on_gpu = method, faiss.get_num_gpus() > 0
        self.index = faiss.index_cpu_to_all_gpus(index) if self.on_gpu else index
        self.space = faiss.GpuParameterSpace() if self.on_gpu else faiss.ParameterSpace()

    def __len__(self):
        return self.index.ntotal

    def search(self, queries, k):
        self.method.tune(self.space, self.index)
        scores, positions = self.index.search(queries.numpy(), k)
        return torch.from_numpy(scores), torch.from_numpy(positions)  # position -1: fewer than k found

    def write(self, path):
        """Write the index to ``path`` (through a temporary file: an existing file is replaced whole or
        not at all); returns the file's SHA-256."""
        faiss = _faiss()
        temporary = path.with_name(path.name + ".tmp")
        try:
            faiss.write_index(faiss.index_gpu_to_cpu(self.index) if self.on_gpu else self.index, str(temporary))
            digest = file_sha256(temporary)
            os.replace(temporary, path)
        except (RuntimeError, OSError) as e:
            if temporary.is_file():
                temporary.unlink()
            raise InferenceError(f"{path}: cannot write the FAISS index ({first_line(e)})") from None
        return digest


def file_sha256(path, block=1 << 24):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass
class FaissExact(_FaissMethod):
    """Exact inner product in FAISS (IndexFlatIP): the ranking of TorchExact."""

    def make(self, faiss, vectors):
        return faiss.IndexFlatIP(vectors.shape[1])


@dataclass
class FaissIVF(_FaissMethod):
    """Approximate: k-means splits the collection into ``nlist`` cells (trained on at most
    ``train_per_cell`` videos per cell), and a query scans its ``nprobe`` nearest cells. More
    cells scanned: higher recall, slower queries; ``nprobe`` can be changed on a built index.
    Both are required: no setting suits every collection. About 4 * sqrt(N) cells is a common
    start; on random vectors (docs/benchmark.md) recall@10 reached 0.95 only when scanning 7/8 of
    the cells (0.49 at 1/4), so measure recall against ``TorchExact`` on your own collection."""
    nlist: int
    nprobe: int
    train_per_cell: int = 64
    seed: int = 0

    def make(self, faiss, vectors):
        if not 1 <= self.nprobe <= self.nlist:
            raise InferenceError(f"FaissIVF nprobe = {self.nprobe}: expected 1 to nlist = {self.nlist} cells")
        if len(vectors) < self.nlist:
            raise InferenceError(f"FaissIVF nlist = {self.nlist} cells for {len(vectors)} videos: use at most "
                                 "one cell per video, or FaissExact for a small collection")
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(vectors.shape[1]), vectors.shape[1], self.nlist,
                                   faiss.METRIC_INNER_PRODUCT)
        sample = np.random.default_rng(self.seed).permutation(len(vectors))[:self.nlist * self.train_per_cell]
        index.cp.seed = self.seed
        index.train(vectors[np.sort(sample)])
        return index

    def tune(self, space, index):
        space.set_index_parameter(index, "nprobe", self.nprobe)


SEARCH_METHODS = {cls.__name__: cls for cls in (TorchExact, FaissExact, FaissIVF)}


class VideoIndex:
    """Video ids and their L2-normalised embeddings [N, P], stored as one safetensors file, searched
    with ``method`` (default: TorchExact). A FAISS method's index is saved beside that file."""

    def __init__(self, ids, embeddings, method=None):
        self.ids = [str(i) for i in ids]
        self.embeddings = embeddings.float().cpu().contiguous()
        if len(self.ids) != len(self.embeddings):
            raise InferenceError(f"{len(self.ids)} ids for {len(self.embeddings)} embeddings")
        self._position = {vid: i for i, vid in enumerate(self.ids)}
        self.method = method or TorchExact()
        self._searcher = None  # built on the first search, or read by load

    def __len__(self):
        return len(self.ids)

    def position(self, video_id):
        if video_id not in self._position:
            raise InferenceError(f"unknown video id '{video_id}' (the index holds {len(self)} videos, "
                                 f"e.g. {', '.join(self.ids[:3])})")
        return self._position[video_id]

    def build(self):
        """Build the search structure now (else the first search does); returns the index."""
        if self._searcher is None:
            self._searcher = self.method.build(self.embeddings)
        return self

    def search(self, queries, top):
        """The ``top`` best videos for each of ``queries`` [Q, P]: a list per query of (position,
        score), best first (an approximate method may find fewer)."""
        if top < 1:
            raise InferenceError(f"top = {top}: ask for at least 1 video")
        scores, positions = self.build()._searcher.search(queries.float().cpu().contiguous(), min(top, len(self)))
        return [[(i, s) for i, s in zip(p, sc) if i >= 0] for p, sc in zip(positions.tolist(), scores.tolist())]

    def save(self, path):
        """Write the index to ``path`` (a safetensors file). A FAISS method's index goes first to
        ``<stem>.<hash>.faiss`` beside it, its SHA-256 recorded in the safetensors file, so that a
        load never pairs the embeddings with another save's FAISS file; each file is replaced whole."""
        path = Path(path)
        if path.suffix == ".faiss":
            raise InferenceError(f"{path}: an index is saved as a safetensors file (e.g. "
                                 f"{path.with_suffix('.safetensors').name}); its FAISS file is written beside it")
        method = {"name": type(self.method).__name__, "params": asdict(self.method)}
        previous = _saved_file(path)  # the FAISS file of the save this one replaces
        temporary = path.with_name(path.name + ".tmp")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(self.method, _FaissMethod):
                content = hashlib.sha256(self.embeddings.numpy())
                content.update(json.dumps(self.ids).encode())
                structure = path.with_name(f"{path.stem}.{content.hexdigest()[:8]}.faiss")
                method.update(file=structure.name, sha256=self.build()._searcher.write(structure))
            save_file({"embeddings": self.embeddings}, str(temporary),
                      metadata={"format": INDEX_FORMAT, "ids": json.dumps(self.ids), "method": json.dumps(method)})
            os.replace(temporary, path)
        except OSError as e:
            temporary.unlink(missing_ok=True)
            raise InferenceError(f"{path}: cannot write the index ({e.strerror or e})") from None
        if previous and previous != method.get("file"):
            (path.parent / previous).unlink(missing_ok=True)
        return path

    @classmethod
    def load(cls, path, method=None):
        """The index saved at ``path``, searched as it was saved (a FAISS index read from its file),
        or with ``method``, built anew."""
        path = Path(path)
        if not path.is_file():
            raise InferenceError(f"{path}: index file not found")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                ours = meta.get("format") == INDEX_FORMAT
                # A copy in fresh (aligned) memory: matmul kernels round differently on the
                # offset buffer safetensors returns, and scores must not depend on that.
                embeddings = f.get_tensor("embeddings").clone() if ours else None
            ids = json.loads(meta["ids"]) if ours else None
            saved = json.loads(meta.get("method", '{"name": "TorchExact", "params": {}}')) if ours else None
        except (SafetensorError, OSError, KeyError, ValueError) as e:
            raise InferenceError(f"{path}: not a readable video index ({first_line(e)})") from None
        if not ours:
            raise InferenceError(f"{path}: not a video index written by VideoIndex.save")
        if method is not None:
            return cls(ids, embeddings, method)
        if saved.get("name") not in SEARCH_METHODS:
            raise InferenceError(f"{path}: unknown search method {saved.get('name')!r} "
                                 f"(expected one of {', '.join(SEARCH_METHODS)})")
        try:
            method = SEARCH_METHODS[saved["name"]](**saved.get("params", {}))
        except TypeError as e:
            raise InferenceError(f"{path}: bad parameters of search method {saved['name']} ({e})") from None
        index = cls(ids, embeddings, method)
        if "file" in saved:
            index._searcher = method.read(path.parent / saved["file"], saved.get("sha256"))
        return index


def _saved_file(path):
    """The name of the FAISS file that the index saved at ``path`` names, if any."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        return json.loads(meta["method"]).get("file") if meta.get("format") == INDEX_FORMAT else None
    except (SafetensorError, OSError, KeyError, ValueError):
        return None


class Retriever:
    """A trained model with its tokenizer and the preprocessing settings of its config."""

    def __init__(self, model, tokenizer, config, device="cpu"):
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.tokenizer = tokenizer
        self.config = config
        self.feature_dim = config["data"]["feature_dim"]
        # Converted reference teachers pool with another tokenizer's mask (docs/reference.md §2.3).
        model_cfg = config["model"]
        self.pool_tokenizer = (load_tokenizer(model_cfg["pool_mask_tokenizer"])
                               if model_cfg["pool_with_student_mask"] else None)

    @classmethod
    def from_checkpoint(cls, path, device="cpu"):
        state = load_checkpoint(path)
        config = upgrade_saved_config(state["config"])
        return cls(*model_from_checkpoint(config, state, path), config, device)

    def encode_texts(self, texts, batch_size=256):
        """[len(texts), P] normalised text embeddings of texts read as the model read its captions:
        regex-cleaned by an English-input teacher of a dataset whose teachers read cleaned English
        (``model.role``, ``data.clean_english``; its queries are taken as English), else as typed."""
        check_texts(texts)
        return self.model.embed_captions(texts, self.tokenizer, self.config["data"]["max_words_eval"],
                                         EnglishReading.of(self.config).clean, self.pool_tokenizer, batch_size)

    def query_token_ids(self, query):
        """The token ids of ``query`` as ``encode_texts`` reads it, before truncation."""
        text = clean_caption(query) if EnglishReading.of(self.config).clean else query
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def unreadable(self, query):
        """True when the checkpoint's tokenizer reads ``query`` as unknown tokens only (e.g. a
        script outside its vocabulary): a ranking for it would mean nothing."""
        unknown = self.tokenizer.unk_token_id
        return unknown is not None and all(i == unknown for i in self.query_token_ids(query))

    def check_query(self, query):
        """Refuse an empty query or one the tokenizer cannot read, and warn when the query is cut to
        ``data.max_words_eval`` tokens."""
        check_texts([query])
        if self.unreadable(query):
            raise InferenceError(f"query {_shown(query)}: the checkpoint's tokenizer "
                                 f"({self.config['model']['text_encoder']}) reads this query as unknown tokens only; "
                                 "write it in a language and script that tokenizer covers")
        ids = self.query_token_ids(query)
        room = self.config["data"]["max_words_eval"] - self.tokenizer.num_special_tokens_to_add()
        if len(ids) > room:
            kept = self.tokenizer.decode(ids[:room])
            warnings.warn(f"query of {len(ids)} tokens cut to the first {room} (config key 'data.max_words_eval'): "
                          f"only {_shown(kept)} is read")

    def encode_videos(self, features, batch_size=256, progress=False, ids=None):
        """[len(features), P] normalised embeddings of [frames, feature_dim] arrays; ``ids`` name
        the videos in errors."""
        names = [f"video '{i}'" for i in ids] if ids is not None else [f"video {i}" for i in range(len(features))]
        checked = [self.check_features(f, name) for name, f in zip(names, features)]
        return self.model.embed_videos(checked, self.config["data"]["n_video_tokens"], batch_size, progress)

    def build_index(self, ids, features, batch_size=256, progress=True, method=None):
        """Encode a collection once (a progress bar shows on a terminal), to be searched with
        ``method`` (default: TorchExact); save the index to reuse it."""
        if len(ids) != len(features):
            raise InferenceError(f"{len(ids)} video ids for {len(features)} feature arrays")
        return VideoIndex(ids, self.encode_videos(features, batch_size, progress, ids=ids), method)

    def search(self, query, index, top=10):
        """The ``top`` best videos of ``index`` for ``query``: [(video_id, cosine score)], best first."""
        self.check_index(index)
        q = self.encode_texts([query])[0]
        return [(index.ids[i], float(s)) for i, s in index.search(q[None], top)[0]]

    def check_index(self, index):
        """An index of embeddings of another size than this model's is an InferenceError."""
        size = self.config["model"]["projection_dim"]
        if index.embeddings.shape[1] != size:
            raise InferenceError(f"the index holds {index.embeddings.shape[1]}-d embeddings but this model "
                                 f"makes {size}-d ones (model.projection_dim); rebuild the index with this checkpoint")

    def check_features(self, features, name="the video"):
        """``features`` as a float32 [frames, feature_dim] array; another shape is an InferenceError."""
        shape = np.shape(features)
        if len(shape) != 2 or shape[1] != self.feature_dim:
            raise InferenceError(f"{name}: features of shape {tuple(shape)}, expected [frames, "
                                 f"{self.feature_dim}] (config data.feature_dim)")
        return np.asarray(features, dtype=np.float32)


def check_texts(texts):
    """Every text must hold some words: an empty query is an InferenceError."""
    if isinstance(texts, str):
        raise InferenceError("expected a list of texts, got one string")
    for i, text in enumerate(texts):
        if not isinstance(text, str) or not text.strip():
            raise InferenceError(f"empty query (text {i} is {text!r}); give some words to search for")


def _shown(text, limit=60):
    return repr(text if len(text) <= limit else text[:limit] + "...")


def read_videos(path, layout, feature_key, allow_duplicate_ids=False):
    """A data file as the data layer reads it: its evaluation view, or its training view when it has
    no evaluation captions (a training file). A folder (or the files) of the safe layout is read as
    such, whatever pickle layout the checkpoint's config names. Its items pass the checks that
    training and evaluation make (``check_items``: no NaN or inf features, ...)."""
    if layout in PICKLE_LAYOUTS and is_safe_path(path):
        layout = "safe"
    items = load_pickle(path) if layout in PICKLE_LAYOUTS else None  # unpickled once for both views
    try:
        corpus = read_corpus(path, layout, feature_key, "eval", items=items)
    except SplitNotInFile:
        corpus = read_corpus(path, layout, feature_key, "train", items=items)
    check_items(corpus, allow_duplicate_ids)
    return corpus


def find_video(corpus, video_id):
    """Position of ``video_id`` in ``corpus``; an unknown id is an InferenceError naming the file."""
    try:
        return corpus.ids.index(video_id)
    except ValueError:
        raise InferenceError(f"{corpus.path}: unknown video id '{video_id}' ({len(corpus)} videos, "
                             f"e.g. {', '.join(corpus.ids[:3])})") from None


_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{title}</title>
<style>
body {{ font-family: sans-serif; margin: 2em; max-width: 70em; }}
table {{ border-collapse: collapse; width: 100%; }}
th, td {{ border-bottom: 1px solid #ccc; padding: .4em; text-align: left; vertical-align: top; }}
td.score {{ font-family: monospace; white-space: nowrap; }}
.bar {{ background: #4a7; height: .5em; }}
.meta {{ color: #555; }}
ul {{ margin: 0; padding-left: 1.2em; }}
</style>
</head>
<body>
<h1>Query: <q>{query}</q></h1>
<p class="meta">checkpoint {checkpoint}<br>{n} videos of {data}</p>
<table>
<thead><tr><th>rank</th><th>score</th><th>video</th><th>captions in the data file ({lang})</th></tr></thead>
<tbody>
{rows}
</tbody>
</table>
</body>
</html>
"""


def results_html(query, hits, corpus, checkpoint=""):
    """A self-contained HTML page (no external resources, all text escaped) of ranked ``hits`` with
    each video's captions from ``corpus``, so that a person can judge the ranking."""
    esc = html.escape
    position = {vid: i for i, vid in enumerate(corpus.ids)}
    first = ENGLISH if ENGLISH in corpus.captions else next(iter(corpus.captions), None)
    rows = []
    for rank, (video_id, score) in enumerate(hits, 1):
        i = position[video_id]
        lines = [esc(c) for c in corpus.captions[first][i]] if first else []
        events = (corpus.extras[i] if corpus.extras else {}).get("events") or []
        lines += [f"<i>event, frames [{esc(str(e.get('start')))}, {esc(str(e.get('end')))}):</i> "
                  f"{esc(str(e['caption_en']))}"
                  for e in events if "caption_en" in e]
        others = "".join(f"<li>{esc(lang)}: {esc(' | '.join(corpus.captions[lang][i]))}</li>"
                         for lang in corpus.captions if lang != first)
        cell = "<ul>" + "".join(f"<li>{line}</li>" for line in lines) + "</ul>"
        if others:
            cell += f"<details><summary>other languages</summary><ul>{others}</ul></details>"
        width = max(0.0, min(1.0, score)) * 6
        rows.append(f'<tr><td>{rank}</td><td class="score">{score:.3f}<div class="bar" style="width:{width:.2f}em">'
                    f"</div></td><td>{esc(video_id)}</td><td>{cell}</td></tr>")
    return _PAGE.format(title=esc(f"Search: {query}"), query=esc(query), checkpoint=esc(str(checkpoint)),
                        n=len(corpus), data=esc(str(corpus.path)), lang=esc(str(first)), rows="\n".join(rows))
