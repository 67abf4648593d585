"""Evaluation: embed every (video, caption) pair of the evaluation set, group by video id, rank.

Captions of one video id are averaged into one query (``multi_caption = average``, the
reference's behaviour, §4) or ranked as separate queries (``separate``). Video embeddings of
items sharing an id are averaged. Evaluation always runs in float32, as the reference's did (§4),
whatever ``trainer.mixed_precision`` says, so reported numbers do not depend on the training
precision; the evaluation batch size then changes the embeddings only by float32 rounding.
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

from data_loader.corpus import ENGLISH
from data_loader.dataset import POOL_MASK, STUDENT
from model.metric import STATS, mean_over_languages, retrieval_metrics_from_embeddings
from parse_config import ConfigError
from utils.device import to_device
from utils.distributed import gather_to_main, on_main, rank


@dataclass
class LanguageScores:
    queries: torch.Tensor       # [queries, P], L2-normalised
    videos: torch.Tensor        # [videos, P], L2-normalised
    query_video: torch.Tensor   # [queries] ground-truth column of each query
    query_ids: list             # video id each query describes
    video_ids: list

    @property
    def sims(self):
        """[queries, videos] cosine similarities (materialised on request only)."""
        return self.queries @ self.videos.t()


@torch.no_grad()
def embed_eval_set(model, loader, languages, device):
    """Text embeddings per language, video embeddings, item positions and caption flags of this
    process's slice of the evaluation set, all on the CPU in fp32; None for an empty slice (a rank
    beyond the items of a small evaluation set)."""
    model.eval()
    texts = {lang: [] for lang in languages}
    has = {lang: [] for lang in languages}
    videos, items = [], []
    # disable=None: no bar when stderr is not a terminal, where a bar cleared by "\r" glues onto the next line
    for batch in tqdm(loader, desc="embed", leave=False, dynamic_ncols=True, disable=None if rank() == 0 else True):
        batch = to_device(batch, device)
        with torch.autocast(device.type, enabled=False):  # float32 even inside a caller's autocast
            videos.append(model.encode_video(batch["video"], batch["video_mask"]).float().cpu())
            pool = batch["text"].get(POOL_MASK)
            pool_masks = {lang: pool[lang]["attention_mask"] for lang in languages} if pool is not None else None
            tokens = {lang: batch["text"][STUDENT][lang] for lang in languages}
            text = model.encode_text_by_language(tokens, pool_masks)
            for lang in languages:
                texts[lang].append(text[lang].float().cpu())
        for lang in languages:
            has[lang].append(batch["has_caption"][lang].cpu())
        items.append(batch["index"].cpu())
    if not items:
        return None
    return ({lang: torch.cat(v) for lang, v in texts.items()}, torch.cat(videos), torch.cat(items),
            {lang: torch.cat(v) for lang, v in has.items()})


def _concat(parts):
    """The per-rank outputs of ``embed_eval_set`` joined into those of the whole evaluation set."""
    parts = [p for p in parts if p is not None]
    if len(parts) == 1:
        return parts[0]
    languages = parts[0][0]
    return ({lang: torch.cat([p[0][lang] for p in parts]) for lang in languages}, torch.cat([p[1] for p in parts]),
            torch.cat([p[2] for p in parts]), {lang: torch.cat([p[3][lang] for p in parts]) for lang in languages})


def _group_mean(values, groups, num_groups):
    out = torch.zeros(num_groups, values.shape[1], dtype=values.dtype)
    out.index_add_(0, groups, values)
    counts = torch.bincount(groups, minlength=num_groups).clamp(min=1).unsqueeze(1)
    return out / counts


def score_languages(texts, videos, items, has_caption, item_ids, multi_caption):
    """Similarity matrices per language, videos grouped by id."""
    pair_ids = [item_ids[i] for i in items.tolist()]
    video_ids = list(dict.fromkeys(pair_ids))
    column = {vid: j for j, vid in enumerate(video_ids)}
    pair_column = torch.tensor([column[v] for v in pair_ids], dtype=torch.long)
    video_emb = F.normalize(_group_mean(videos, pair_column, len(video_ids)), dim=1, eps=1e-8)
    scores = {}
    for lang, emb in texts.items():
        keep = has_caption[lang].bool()
        emb, cols = emb[keep], pair_column[keep]
        if multi_caption == "average":
            present = torch.unique(cols)  # sorted video columns that have a caption in this language
            emb = _group_mean(emb, torch.searchsorted(present, cols), len(present))
            cols = present
        scores[lang] = LanguageScores(queries=F.normalize(emb, dim=1, eps=1e-8), videos=video_emb, query_video=cols,
                                      query_ids=[video_ids[c] for c in cols.tolist()], video_ids=video_ids)
    return scores


def _means(languages):
    """The means over languages that a summary holds besides the languages: name -> languages left out."""
    means = {"mean": ()}
    if ENGLISH in languages and len(languages) > 1:
        means[f"mean_no_{ENGLISH}"] = (ENGLISH,)
    return means


def metrics_from_scores(scores, tie_break, total_queries=None, device="cpu"):
    """Ranks computed in chunks on ``device`` from the embeddings: memory stays bounded for any size."""
    per_lang = {lang: retrieval_metrics_from_embeddings(s.queries.to(device), s.videos.to(device),
                                                        s.query_video.to(device), tie_break=tie_break,
                                                        total_queries=total_queries)
                for lang, s in scores.items()}
    summary = dict(per_lang)
    for name, exclude in _means(per_lang).items():
        summary[name] = mean_over_languages(per_lang, exclude=exclude)
    return summary


def recall_denominator(eval_cfg, corpus):
    """The R@K denominator of an evaluation of ``corpus``: ``eval.total_queries`` when set; the
    number of items in the evaluation file under ``eval.denominator = file_items`` (the reference's
    RUDDER ``len(data)``, which counts items sharing an id once each, §9); else None, the queries
    ranked in each language."""
    if eval_cfg["total_queries"] is not None:
        return eval_cfg["total_queries"]
    return len(corpus) if eval_cfg["denominator"] == "file_items" else None


def metric_names(languages):
    """The keys ``flat_metrics`` gives for an evaluation of ``languages``."""
    return [f"{direction}_{group}_{stat}" for group in [*languages, *_means(languages)]
            for direction in ("t2v", "v2t") for stat in STATS]


def check_monitor(monitor, languages):
    """``trainer.monitor`` must be 'off' or a metric that evaluating ``languages`` reports."""
    if monitor != "off" and monitor not in metric_names(languages):
        raise ConfigError(f"config key 'trainer.monitor' = '{monitor}' is not an evaluation metric of this run; "
                          f"expected 'off' or a name such as t2v_mean_R1, v2t_{languages[0]}_MedR")


def flat_metrics(summary):
    """{"t2v_de_R1": ..., "v2t_mean_R1": ...} for logging and monitoring."""
    return {f"{direction}_{lang}_{stat}": value
            for lang, directions in summary.items()
            for direction, stats in directions.items()
            for stat, value in stats.items() if stat != "num_queries"}


def evaluate(model, loader, languages, eval_cfg, device, return_scores=False):
    """Metrics of ``model`` on the evaluation set. Under torch.distributed each rank embeds its
    slice, rank 0 ranks the whole set once and every rank receives the metrics; ``scores`` (with
    ``return_scores``) exist on rank 0 only (None elsewhere)."""
    corpus = loader.dataset.corpus
    parts = gather_to_main(embed_eval_set(model, loader, languages, device))
    scores = None

    def rank_all():
        nonlocal scores
        texts, videos, items, has = _concat(parts)
        scores = score_languages(texts, videos, items, has, corpus.ids, eval_cfg["multi_caption"])
        return metrics_from_scores(scores, eval_cfg["tie_break"], recall_denominator(eval_cfg, corpus), device)

    summary = on_main(rank_all)
    return (summary, scores) if return_scores else summary
