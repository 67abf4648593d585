"""The text-video retrieval model: a Hugging Face text encoder and a small video transformer.

The math follows the reference model (docs/reference.md §2.2–2.4) so that its checkpoints can be
converted: gated projections, a LayerNorm on both sides, a learned CLS token and two pre-norm
attention blocks over the video frames with key masking and no positional embedding. The
reference's dead parts (audio network, unused heads, a duplicated module alias) are left out.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from data_loader.batch import Tokens
from data_loader.dataset import TokenTable
from common.checkpoint import load_weights
from common.errors import UserError
from common.hub import load_named

# Every LayerNorm of the reference model (the video norm, the text norm, the fusion blocks' norms)
# has eps 1e-6, not PyTorch's 1e-5: converted checkpoints need it to reproduce their embeddings
# (docs/reference.md §2.1).
LAYER_NORM_EPS = 1e-6


class GatedProjection(nn.Module):
    """y = h * sigmoid(W_g h) with h = W x + b: the reference's 'gated' unit (docs/reference.md §2.2)."""

    def __init__(self, in_dim, out_dim):
        super().__init__()
        self.fc = nn.Linear(in_dim, out_dim)
        self.gate = nn.Linear(out_dim, out_dim)

    def forward(self, x):
        h = self.fc(x)
        return h * torch.sigmoid(self.gate(h))


class Attention(nn.Module):
    def __init__(self, width, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x, key_mask):
        b, n, w = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)
        # key_mask [B, N] -> [B, 1, 1, N]: padded frames receive no attention.
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask[:, None, None, :])
        return self.proj(out.transpose(1, 2).reshape(b, n, w))


class Block(nn.Module):
    def __init__(self, width, heads, mlp_ratio):
        super().__init__()
        hidden = int(width * mlp_ratio)
        self.norm1 = nn.LayerNorm(width, eps=LAYER_NORM_EPS)
        self.attn = Attention(width, heads)
        self.norm2 = nn.LayerNorm(width, eps=LAYER_NORM_EPS)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))

    def forward(self, x, key_mask):
        x = x + self.attn(self.norm1(x), key_mask)
        return x + self.mlp(self.norm2(x))


class VideoEncoder(nn.Module):
    """Frame features [B, N, D] with a mask [B, N] -> one embedding per video (docs/reference.md §2.4)."""

    def __init__(self, feature_dim, width=512, projection_dim=512, depth=2, heads=4, mlp_ratio=1.0):
        super().__init__()
        self.feature_dim = feature_dim
        self.token_proj = GatedProjection(feature_dim, width)
        self.norm = nn.LayerNorm(width, eps=LAYER_NORM_EPS)
        self.masking_token = nn.Parameter(torch.zeros(width))
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.blocks = nn.ModuleList(Block(width, heads, mlp_ratio) for _ in range(depth))
        self.proj = GatedProjection(width, projection_dim)
        self._init_transformer()

    def _init_transformer(self):
        # The reference initialises only its fusion transformer this way (timm's ViT init);
        # the projections keep PyTorch's default initialisation.
        for module in self.blocks.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        nn.init.trunc_normal_(self.masking_token, std=0.02)

    def forward(self, video, mask):
        x = self.norm(self.token_proj(video))
        mask = mask.bool()
        # A video without frames attends to a learned masking token instead of nothing. Written
        # without data-dependent branching, so the token is always part of the graph (as DDP expects).
        empty = ~mask.any(dim=1, keepdim=True)
        first = torch.where(empty, self.masking_token.to(x.dtype), x[:, 0])
        cls = self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype)
        x = torch.cat([cls, first.unsqueeze(1), x[:, 1:]], dim=1)
        mask = torch.cat([mask.new_ones(mask.shape[0], 1), mask[:, :1] | empty, mask[:, 1:]], dim=1)
        for block in self.blocks:
            x = block(x, mask)
        return self.proj(x[:, 0])


# Rows per length bucket of a text batch (see TextEncoder.forward). On 2 CPU cores, one C2KD step of
# a Multi-Toy student batch (9 languages x 64 captions) took 140 ms as one batch, and 111, 104, 101,
# 99 and 104 ms in 2, 3, 4, 6 and 9 buckets (96 to 144 rows the fastest). Not measured on a GPU,
# where larger buckets may pay: set model.length_bucket_rows.
DEFAULT_BUCKET_ROWS = 128


class TextEncoder(nn.Module):
    """A Hugging Face encoder, mean-pooled over the attention mask, then LayerNorm and a gated
    projection (docs/reference.md §2.3)."""

    def __init__(self, backbone, projection_dim=512, bucket_rows=None):
        super().__init__()
        self.backbone = backbone
        # Run only the columns up to the last real token (see forward). Set to False, every column
        # up to max_words runs, as in the reference; the benchmark times both.
        self.cut_padding = True
        # Rows per length bucket (config key model.length_bucket_rows; None: one bucket).
        self.bucket_rows = bucket_rows
        # Mean pooling replaces the encoder's pooler head (if it has one): freeze it so that
        # no parameter is left without a gradient (which DistributedDataParallel cannot reduce).
        if getattr(backbone, "pooler", None) is not None:
            backbone.pooler.requires_grad_(False)
        hidden = backbone.config.hidden_size
        self.norm = nn.LayerNorm(hidden, eps=LAYER_NORM_EPS)
        self.proj = GatedProjection(hidden, projection_dim)

    def forward(self, input_ids, attention_mask, pool_mask=None):
        """``pool_mask`` replaces the attention mask for pooling only: converted reference teachers
        pooled with the student tokenizer's mask (docs/reference.md §2.3, quirk kept for their checkpoints).

        Columns after a row's last real token are masked out of attention and of pooling, so they
        change no output (beyond float rounding); they are cut before the backbone runs. The rows
        are sorted by length and run in buckets of about ``bucket_rows`` rows, each cut to its
        longest row, so a batch of short and long captions (nine languages of one batch) costs
        about what its captions cost, not rows x the longest caption. A column that the pooling
        mask uses counts as holding a token. On a GPU, reading the lengths is one device sync."""
        if not self.cut_padding:
            return self._encode(input_ids, attention_mask, pool_mask)
        buckets = length_buckets(row_lengths(attention_mask, pool_mask), self.bucket_rows)
        outs = [self._encode(input_ids[rows, :n], attention_mask[rows, :n], _cut(pool_mask, rows, n))
                for rows, n in buckets]
        if len(outs) == 1:
            return outs[0]
        return torch.cat(outs)[torch.argsort(torch.cat([rows for rows, _ in buckets]))]  # the input's row order

    def _encode(self, input_ids, attention_mask, pool_mask):
        states = self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        weights = (attention_mask if pool_mask is None else pool_mask).unsqueeze(-1).to(states.dtype)
        pooled = (states * weights).sum(1) / weights.sum(1).clamp(min=1.0)
        return self.proj(self.norm(pooled))


def _cut(mask, rows, length):
    return None if mask is None else mask[rows, :length]


def row_lengths(*masks):
    """Per row, 1 + the last column set in any of the masks (None: skipped); 0 for an empty row."""
    used = torch.stack([m.bool() for m in masks if m is not None]).any(dim=0)
    columns = torch.arange(1, used.shape[1] + 1, device=used.device)
    return (used * columns).amax(dim=1)


def length_buckets(lengths, bucket_rows):
    """[(rows, columns)]: the row indices of ``lengths`` sorted by length and cut into buckets of
    about ``bucket_rows`` rows (None: one bucket, whose rows are ``slice(None)``, all in order),
    each with the columns its longest row needs (at least 1). Reading the lengths is one device sync."""
    buckets = -(-len(lengths) // bucket_rows) if bucket_rows else 1
    if buckets <= 1:
        return [(slice(None), max(int(lengths.max()), 1) if len(lengths) else 1)]
    rows = torch.argsort(lengths, stable=True).tensor_split(buckets)
    longest = lengths[torch.stack([r[-1] for r in rows])].clamp(min=1).tolist()
    return list(zip(rows, longest))


def used_length(*masks):
    """1 + the last column in which any row of any mask (None: skipped) is set; at least 1."""
    [(_, columns)] = length_buckets(row_lengths(*masks), None)
    return columns


class RetrievalModel(nn.Module):
    def __init__(self, text, video):
        super().__init__()
        self.text = text
        self.video = video

    def forward(self, video, video_mask, texts):
        """Video embeddings [B, P] and {lang: text embeddings [B, P]} for one batch. Training goes
        through here so that DistributedDataParallel sees a single forward call."""
        return self.encode_video(video, video_mask), self.encode_text_by_language(texts)

    def encode_text_by_language(self, texts, pool_masks=None):
        """{lang: [B, P]} for {lang: Tokens [B, L]} (``pool_masks``: {lang: [B, L]} or None). The
        captions of all languages go through the text encoder as one [languages x B, L] batch, which
        it runs in length buckets: fewer, larger matrix products than one call per language, with
        the same result up to float32 rounding."""
        langs = list(texts)
        tokens = Tokens.cat([texts[lang] for lang in langs])
        pool_mask = torch.cat([pool_masks[lang] for lang in langs]) if pool_masks is not None else None
        text = self.encode_text(tokens, pool_mask=pool_mask).split(len(tokens.input_ids) // len(langs))
        return dict(zip(langs, text))

    def encode_text(self, tokens, pool_mask=None):
        """[B, P] for ``tokens`` (a Tokens, or a tokenizer's output: both name input_ids and attention_mask)."""
        return self.text(tokens.input_ids, tokens.attention_mask, pool_mask=pool_mask)

    def encode_video(self, video, mask):
        return self.video(video, mask)

    @property
    def embedding_dim(self):
        return self.video.proj.gate.out_features

    def embed_captions(self, captions, tokenizer, max_words, clean=False, pool_tokenizer=None, batch_size=256):
        """[len(captions), P] normalised embeddings of caption strings, tokenized as evaluation
        captions are (regex-cleaned when ``clean``). With ``pool_tokenizer``, text is pooled with that
        tokenizer's mask of the raw caption, as converted reference teachers pool (docs/reference.md §2.3)."""
        rows = [[c] for c in captions]
        table = TokenTable(rows, tokenizer, max_words, clean)
        pool = (TokenTable(rows, pool_tokenizer, max_words, clean=False).attention_mask
                if pool_tokenizer is not None else None)
        return self.embed_texts(table.input_ids, table.attention_mask, pool, batch_size)

    @torch.no_grad()
    def embed_texts(self, input_ids, attention_mask, pool_mask=None, batch_size=256, progress=False):
        """[rows, P] L2-normalised fp32 embeddings, on the CPU, of token rows as a TokenTable holds
        them; ``pool_mask`` rows replace the attention mask for pooling (see TextEncoder)."""
        device = next(self.parameters()).device
        out = []
        for start in _batches(len(input_ids), batch_size, "embed texts", progress):
            rows = slice(start, start + batch_size)
            pool = pool_mask[rows].long().to(device) if pool_mask is not None else None
            out.append(self.text(input_ids[rows].long().to(device), attention_mask[rows].long().to(device),
                                 pool_mask=pool).float().cpu())
        return self._normalized(out)

    @torch.no_grad()
    def embed_videos(self, features, n_tokens, batch_size=256, progress=False):
        """[len(features), P] L2-normalised fp32 embeddings, on the CPU, of [frames, feature_dim]
        arrays, each cut or padded to ``n_tokens`` frames as in training."""
        from data_loader.dataset import video_tokens
        device = next(self.parameters()).device
        out = []
        for start in _batches(len(features), batch_size, "embed videos", progress):
            pairs = [video_tokens(f, n_tokens) for f in features[start:start + batch_size]]
            video = torch.stack([v for v, _ in pairs]).to(device)
            mask = torch.stack([m for _, m in pairs]).to(device)
            out.append(self.encode_video(video, mask).float().cpu())
        return self._normalized(out)

    def _normalized(self, parts):
        if not parts:
            return torch.zeros(0, self.embedding_dim)
        return F.normalize(torch.cat(parts), dim=1, eps=1e-8)


def _batches(n, batch_size, desc, progress):
    """Batch starts over ``n`` rows, with a progress bar on a terminal when ``progress``."""
    from tqdm import tqdm
    return tqdm(range(0, n, batch_size), desc=desc, unit="batch", disable=None if progress else True,
                leave=False, dynamic_ncols=True)


class ModelError(UserError, ValueError):
    """A model cannot be built from its configuration."""


def load_backbone(name, pretrained=True):
    """The text encoder named by a hub id or a local folder, through transformers' Auto classes."""
    from transformers import AutoConfig, AutoModel

    def load(**options):
        # float32 weights whatever dtype the encoder's config.json names (transformers would load a
        # bfloat16 one as bfloat16): mixed precision comes from autocast, over float32 weights.
        if pretrained:
            return AutoModel.from_pretrained(name, dtype=torch.float32, **options)
        return AutoModel.from_config(AutoConfig.from_pretrained(name, **options), dtype=torch.float32)
    return load_named("text encoder", name, load, ModelError)


def load_tokenizer(name):
    from transformers import AutoTokenizer
    return load_named("tokenizer", name, lambda **options: AutoTokenizer.from_pretrained(name, **options), ModelError,
                      probe_file="tokenizer_config.json", expected="")


def build_model(model_cfg, feature_dim, pretrained_text=True):
    """Build from the ``model`` section of a resolved config (a saved one goes through
    ``parse_config.upgrade_saved_config`` first). With ``pretrained_text=False`` the text encoder
    is built from its configuration only, for weights that a checkpoint will provide."""
    backbone = load_backbone(model_cfg["text_encoder"], pretrained=pretrained_text)
    text = TextEncoder(backbone, projection_dim=model_cfg["projection_dim"],
                       bucket_rows=model_cfg["length_bucket_rows"])
    video = VideoEncoder(feature_dim, width=model_cfg["width"], projection_dim=model_cfg["projection_dim"],
                         depth=model_cfg["depth"], heads=model_cfg["heads"], mlp_ratio=model_cfg["mlp_ratio"])
    return RetrievalModel(text, video)


def model_from_config(config, pretrained_text=True, tokenizer=None):
    """(model, tokenizer) as a resolved config describes them; ``tokenizer`` reuses one already loaded."""
    tokenizer = tokenizer or load_tokenizer(config["model"]["text_encoder"])
    return build_model(config["model"], config["data"]["feature_dim"], pretrained_text=pretrained_text), tokenizer


def model_from_checkpoint(config, state, path):
    """(model, tokenizer) as ``config`` describes them, with the weights of the loaded checkpoint
    ``state`` read from ``path`` (a mismatch is a one-line CheckpointError naming the file)."""
    model, tokenizer = model_from_config(config, pretrained_text=False)
    return load_weights(model, state, path), tokenizer
