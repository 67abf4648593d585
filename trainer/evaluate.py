"""Evaluation: embed every (video, caption) pair of the evaluation set, group by video id, rank.

Captions of one video id are averaged into one query (``multi_caption = average``, the
reference's behaviour, docs/reference.md §4) or ranked as separate queries (``separate``). Video embeddings of
items sharing an id are averaged. Evaluation always runs in float32, as the reference's did (docs/reference.md §4),
whatever ``trainer.mixed_precision`` says, so reported numbers do not depend on the training
precision; the evaluation batch size then changes the embeddings only by float32 rounding.
"""
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from data_loader.corpus import ENGLISH
from data_loader.dataset import EnglishReading
from model.metric import STATS, EmbeddingScores, mean_rows, retrieval_metrics_from_embeddings, with_mean_rows
from model.model import load_tokenizer
from model.rerank import build_rerankers
from common.distributed import gather_to_main, on_main, rank
from common.errors import ConfigError


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
        batch = batch.to(device)
        with torch.autocast(device.type, enabled=False):  # float32 even inside a caller's autocast
            videos.append(model.encode_video(batch.video, batch.video_mask).float().cpu())
            tokens = {lang: batch.student[lang] for lang in languages}
            text = model.encode_text_by_language(tokens, batch.pool_masks(languages))
            for lang in languages:
                texts[lang].append(text[lang].float().cpu())
        for lang in languages:
            has[lang].append(batch.has_caption[lang].cpu())
        items.append(batch.index.cpu())
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


def metrics_from_scores(scores, tie_break, total_queries=None, device="cpu"):
    """Ranks computed in tiles on ``device`` from the embeddings: memory stays bounded for any size."""
    return with_mean_rows({lang: retrieval_metrics_from_embeddings(s.queries.to(device), s.videos.to(device),
                                                                s.query_video.to(device), tie_break=tie_break,
                                                                total_queries=total_queries)
                        for lang, s in scores.items()})


# ---- test-time re-ranking (test.py): beside the raw metrics, never instead of them ---------------

def rerankers_from_config(eval_cfg):
    """The re-rankers ``eval.rerank`` names, in its order; a wrong name or value is a ConfigError."""
    for key in ("rerank_dsl_temperature", "rerank_qbnorm_beta", "rerank_qbnorm_bank_size"):
        if not eval_cfg[key] > 0:
            raise ConfigError(f"config key 'eval.{key}' = {eval_cfg[key]} must be positive")
    try:
        return build_rerankers(eval_cfg["rerank"], eval_cfg["rerank_dsl_temperature"], eval_cfg["rerank_qbnorm_beta"])
    except ValueError as e:
        raise ConfigError(f"config key 'eval.rerank': {e}") from None


def querybank_description(eval_cfg, bank_embeddings):
    """What the querybanks hold, for labels: their size (fewer than asked where the training file
    has fewer captions) and languages."""
    languages = eval_cfg["rerank_qbnorm_bank_languages"]
    sizes = sorted({len(b) for b in bank_embeddings.values()})
    size = str(sizes[0]) if len(sizes) == 1 else f"{sizes[0]} to {sizes[-1]}"
    where = f"in {'+'.join(languages)}" if languages else "in the query's language"
    return f"bank of {size} training captions {where}"


def draw_querybanks(corpus, eval_languages, eval_cfg, seed):
    """{evaluation language: (language, caption) pairs of its querybank} drawn from the training
    ``corpus``: from the language's own captions, or one mix drawn evenly from
    ``eval.rerank_qbnorm_bank_languages`` for every language."""
    size, mix = eval_cfg["rerank_qbnorm_bank_size"], eval_cfg["rerank_qbnorm_bank_languages"]
    key = "eval.rerank_qbnorm_bank_languages"
    missing = [lang for lang in (mix or eval_languages) if lang not in corpus.languages]
    if missing:
        raise ConfigError(f"config key '{key}': the training file {corpus.path} has no captions in "
                          f"{', '.join(missing)} for the QB-Norm querybank (it has {', '.join(corpus.languages)}); "
                          "list languages it has")
    rng = np.random.default_rng(seed)

    def draw(lang, n):
        captions = [c for caps in corpus.captions[lang] for c in caps]
        return [(lang, captions[i]) for i in sorted(rng.choice(len(captions), min(n, len(captions)), replace=False))]
    if mix:
        shares = [size // len(mix) + (i < size % len(mix)) for i in range(len(mix))]
        bank = [pair for lang, n in zip(mix, shares) for pair in draw(lang, n)]
        return {lang: bank for lang in eval_languages}
    return {lang: draw(lang, size) for lang in eval_languages}


@torch.no_grad()
def embed_querybanks(model, tokenizer, banks, config):
    """{evaluation language: [bank, P] L2-normalised embeddings of its querybank's captions},
    tokenized as evaluation captions are."""
    data, pool_with_student_mask = config["data"], config["model"]["pool_with_student_mask"]
    clean_english = EnglishReading.of(config).clean  # bank captions are read as the model reads captions
    pool_tokenizer = load_tokenizer(config["model"]["pool_mask_tokenizer"]) if pool_with_student_mask else None
    model.eval()
    out = {}
    for lang, pairs in banks.items():
        parts = []
        for caption_lang in dict.fromkeys(cl for cl, _ in pairs):
            captions = [c for cl, c in pairs if cl == caption_lang]
            clean = clean_english and caption_lang == ENGLISH
            parts.append(model.embed_captions(captions, tokenizer, data["max_words_eval"], clean, pool_tokenizer))
        out[lang] = torch.cat(parts)
    return out


def rerank_metrics(scores, rerankers, eval_cfg, bank_embeddings=None, device="cpu"):
    """{re-ranker name: {"label", "metrics"}}: each re-ranker's summary over the languages of
    ``scores`` (as ``metrics_from_scores`` gives the raw one); QB-Norm reads ``bank_embeddings``."""
    out = {}
    for reranker in rerankers:
        per_lang, label = {}, reranker.label()
        for lang, s in scores.items():
            base = EmbeddingScores(s.queries.to(device), s.videos.to(device), s.query_video.to(device))
            bank_sims = None
            if reranker.needs_querybank:
                bank_sims = bank_embeddings[lang].to(device) @ base.videos.t()
                label = reranker.label(querybank_description(eval_cfg, bank_embeddings))
            per_lang[lang] = reranker.metrics(base, bank_sims, eval_cfg["tie_break"], eval_cfg["total_queries"])
        out[reranker.name] = {"label": label, "metrics": with_mean_rows(per_lang)}
    return out


def recall_denominator(eval_cfg, corpus):
    """The R@K denominator of an evaluation of ``corpus``: ``eval.total_queries`` when set (and, with
    ``eval.total_queries_items``, when the file holds that many items); the number of items in the
    evaluation file under ``eval.denominator = file_items`` (the reference's RUDDER ``len(data)``,
    which counts every item, also items that share an id: docs/reference.md §1.6); else None, the
    queries ranked in each language."""
    for_items = eval_cfg["total_queries_items"]
    if eval_cfg["total_queries"] is not None and for_items in (None, len(corpus)):
        return eval_cfg["total_queries"]
    return len(corpus) if eval_cfg["denominator"] == "file_items" else None


def metric_names(languages):
    """The keys ``flat_metrics`` gives for an evaluation of ``languages``."""
    return [f"{direction}_{group}_{stat}" for group in [*languages, *mean_rows(languages)]
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
