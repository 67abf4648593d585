"""Moments inside one video: score every window of consecutive frames against a text query.

Each window of ``window`` frames (stride 1 by default) is encoded as a video on its own, through
``Retriever.encode_videos``, and scored by cosine similarity with the query. The best segment is the
best-scoring window. For the plot, a frame's score is the mean score of the windows that cover it,
a curve as long as the video whose peak lies where the query matches best.
"""
import warnings
from dataclasses import dataclass

import numpy as np

from data_loader import toy
from utils.inference import InferenceError


@dataclass
class Moments:
    windows: list              # (start, end) frame ranges, end exclusive
    window_scores: np.ndarray  # cosine score of each window
    frame_scores: np.ndarray   # per frame: mean score of the windows covering it

    @property
    def best(self):
        """(start, end exclusive, score) of the best window."""
        i = int(np.argmax(self.window_scores))
        return (*self.windows[i], float(self.window_scores[i]))


def sliding_windows(n_frames, size, stride=1):
    """Frame ranges of ``size`` frames every ``stride`` frames; the last one ends at the last frame."""
    if size < 1 or stride < 1:
        raise InferenceError(f"window {size} and stride {stride} must be at least 1")
    if stride > size:  # frames between two windows would get no score
        raise InferenceError(f"stride {stride} is longer than the window of {size} frames: every frame must be in a window")
    if n_frames <= size:
        return [(0, n_frames)]
    starts = list(range(0, n_frames - size + 1, stride))
    if starts[-1] != n_frames - size:
        starts.append(n_frames - size)
    return [(s, s + size) for s in starts]


def score_moments(retriever, features, query, window=4, stride=1, name="the video"):
    """Score of each window and of each frame (the mean over the windows holding it); ``name``
    names the video in errors."""
    features = retriever.check_features(features, name)
    if len(features) == 0:
        raise InferenceError(f"{name} has no frames")
    seen = retriever.config["data"]["n_video_tokens"]
    if min(window, len(features)) > seen:  # the encoder keeps a window's first frames only
        raise InferenceError(f"window {window} is longer than the {seen} frames the model encodes per video "
                             "(its data.n_video_tokens)")
    spans = sliding_windows(len(features), window, stride)
    query_emb = retriever.encode_texts([query])[0]
    scores = (retriever.encode_videos([features[s:e] for s, e in spans]) @ query_emb).numpy()
    total, count = np.zeros(len(features)), np.zeros(len(features))
    for (s, e), score in zip(spans, scores):
        total[s:e] += score
        count[s:e] += 1
    return Moments(spans, scores, total / count)


def matching_event(events, query):
    """Index of the Multi-Toy event sharing the most concepts (action, object, place) with the query,
    read in any language of the toy lexicon; None when the query names none of them."""
    named = {(kind, toy.CONCEPTS[kind][i]) for lang in toy.languages() for kind, i in toy.mentions(query, lang)}
    hits = [sum((kind, event[kind]) in named for kind in toy.KINDS) for event in events]
    best = max(range(len(events)), key=hits.__getitem__, default=None)
    return best if best is not None and hits[best] > 0 else None


def plot_moments(moments, path, query, title="", true_span=None):
    """PNG of the per-frame score with the best window shaded, and the true segment if known."""
    from matplotlib.figure import Figure  # Figure.savefig renders PNGs with Agg; no pyplot state

    fig = Figure(figsize=(8, 3.2), layout="constrained")
    ax = fig.add_subplot()
    frames = np.arange(len(moments.frame_scores))
    ax.plot(frames + 0.5, moments.frame_scores, marker="o", color="tab:blue", label="frame score")
    start, end, score = moments.best
    ax.axvspan(start, end, color="tab:orange", alpha=0.35, label=f"best window [{start}, {end}) {score:.3f}")
    if true_span is not None:
        ax.axvspan(*true_span, facecolor="none", edgecolor="tab:green", hatch="//", linewidth=1.5,
                   label=f"true event [{true_span[0]}, {true_span[1]})")
    ax.set_xlim(0, len(frames))
    ax.set_xlabel("frame")
    ax.set_ylabel("cosine score")
    ax.set_title(f"{title}\n\"{query}\"" if title else f"\"{query}\"", fontsize=10)
    ax.legend(loc="best", fontsize=8)
    with warnings.catch_warnings():  # glyphs missing from the default font (e.g. CJK) are dropped
        warnings.simplefilter("ignore", UserWarning)
        try:
            fig.savefig(path, dpi=100)
        except OSError as e:
            raise InferenceError(f"{path}: cannot write the plot ({e.strerror or e})") from None
    return path
