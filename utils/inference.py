"""Inference from a trained checkpoint: embed texts and videos, index a collection, search it.

    retriever = Retriever.from_checkpoint("runs/toy/translate_train/demo/latest.pt")
    index = retriever.build_index(corpus.ids, corpus.features)   # encode the collection once
    index.save("videos.safetensors")                             # ... and reuse it later
    retriever.search("a person cuts an onion", VideoIndex.load("videos.safetensors"), top=5)

Texts go through the checkpoint's own tokenizer (any language it can read, truncated to
``data.max_words_eval`` tokens), as typed, or regex-cleaned when the checkpoint was trained with
``data.clean_english``: a query to such an English-input teacher is taken as English and read as
its English captions were (its evaluation read other languages raw); videos through the data
layer's ``video_tokens`` (the first ``data.n_video_tokens`` frames, each L2-normalised). Embeddings are L2-normalised, so a score is
the cosine similarity that evaluation ranks by.
"""
import html
import json
import warnings
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from data_loader.corpus import ENGLISH, PICKLE_LAYOUTS, SplitNotInFile, check_items, is_safe_path, read_corpus
from data_loader.dataset import TokenTable, clean_caption
from data_loader.safe_pickle import load_pickle
from model.model import load_tokenizer, model_from_checkpoint
from utils.checkpoint import load_checkpoint
from utils.errors import first_line

INDEX_FORMAT = "c2kd-video-index"


class InferenceError(ValueError):
    """An input to inference is invalid (empty query, unknown id, wrong feature size, bad index)."""


class VideoIndex:
    """Video ids and their L2-normalised embeddings [N, P], stored as one safetensors file."""

    def __init__(self, ids, embeddings):
        self.ids = [str(i) for i in ids]
        self.embeddings = embeddings.float().cpu().contiguous()
        if len(self.ids) != len(self.embeddings):
            raise InferenceError(f"{len(self.ids)} ids for {len(self.embeddings)} embeddings")
        self._position = {vid: i for i, vid in enumerate(self.ids)}

    def __len__(self):
        return len(self.ids)

    def position(self, video_id):
        if video_id not in self._position:
            raise InferenceError(f"unknown video id '{video_id}' (the index holds {len(self)} videos, "
                                 f"e.g. {', '.join(self.ids[:3])})")
        return self._position[video_id]

    def save(self, path):
        path = Path(path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            save_file({"embeddings": self.embeddings}, str(path),
                      metadata={"format": INDEX_FORMAT, "ids": json.dumps(self.ids)})
        except OSError as e:
            raise InferenceError(f"{path}: cannot write the index ({e.strerror or e})") from None
        return path

    @classmethod
    def load(cls, path):
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
        except (SafetensorError, OSError, KeyError, ValueError) as e:
            raise InferenceError(f"{path}: not a readable video index ({first_line(e)})") from None
        if not ours:
            raise InferenceError(f"{path}: not a video index written by VideoIndex.save")
        return cls(ids, embeddings)


class Retriever:
    """A trained model with its tokenizer and the preprocessing settings of its config."""

    def __init__(self, model, tokenizer, config, device="cpu"):
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.tokenizer = tokenizer
        self.config = config
        self.feature_dim = config["data"]["feature_dim"]
        # Converted reference teachers pool with another tokenizer's mask (§2.3).
        model_cfg = config["model"]
        self.pool_tokenizer = (load_tokenizer(model_cfg["pool_mask_tokenizer"])
                               if model_cfg.get("pool_with_student_mask") else None)

    @classmethod
    def from_checkpoint(cls, path, device="cpu"):
        state = load_checkpoint(path)
        return cls(*model_from_checkpoint(state["config"], state, path), state["config"], device)

    def encode_texts(self, texts, batch_size=256):
        """[len(texts), P] normalised text embeddings of texts read as the model read its captions:
        regex-cleaned under ``data.clean_english`` (queries to an English-input teacher are taken
        as English), else as typed."""
        check_texts(texts)
        captions = [[text] for text in texts]
        max_words = self.config["data"]["max_words_eval"]
        table = TokenTable(captions, self.tokenizer, max_words, clean=self.config["data"].get("clean_english", False))
        # Converted reference teachers pool with the student tokenizer's mask of the raw caption (§2.3).
        pool = (TokenTable(captions, self.pool_tokenizer, max_words, clean=False).attention_mask
                if self.pool_tokenizer else None)
        return self.model.embed_texts(table.input_ids, table.attention_mask, pool, batch_size)

    def check_query(self, query):
        """Refuse a query the tokenizer cannot read (every token unknown: its ranking would mean
        nothing), and warn when the query is cut to ``data.max_words_eval`` tokens."""
        check_texts([query])
        text = clean_caption(query) if self.config["data"].get("clean_english", False) else query
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        unknown = self.tokenizer.unk_token_id
        if unknown is not None and all(i == unknown for i in ids):
            raise InferenceError(f"query {_shown(query)}: every token is unknown to the checkpoint's tokenizer "
                                 f"({self.config['model']['text_encoder']}); write it in a language and script "
                                 "that tokenizer covers")
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

    def build_index(self, ids, features, batch_size=256, progress=True):
        """Encode a collection once (a progress bar shows on a terminal); save the index to reuse it."""
        if len(ids) != len(features):
            raise InferenceError(f"{len(ids)} video ids for {len(features)} feature arrays")
        return VideoIndex(ids, self.encode_videos(features, batch_size, progress, ids=ids))

    def search(self, query, index, top=10):
        """The ``top`` best videos of ``index`` for ``query``: [(video_id, cosine score)], best first."""
        if top < 1:
            raise InferenceError(f"top = {top}: ask for at least 1 video")
        q = self.encode_texts([query])[0]
        if index.embeddings.shape[1] != len(q):
            raise InferenceError(f"the index holds {index.embeddings.shape[1]}-d embeddings but this model "
                                 f"makes {len(q)}-d ones; rebuild the index with this checkpoint")
        scores = index.embeddings @ q
        best = torch.topk(scores, min(top, len(index)))
        return [(index.ids[i], float(s)) for s, i in zip(best.values.tolist(), best.indices.tolist())]

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
