"""Tiny multilingual text encoders, built locally for the Multi-Toy benchmark.

Each encoder is a randomly initialised Hugging Face model of one of the
architectures the paper uses (LaBSE and mBERT are BERT, XLM-R, and
DistilUSE's text tower is DistilBERT) with a tokenizer whose vocabulary is
counted from the toy captions, deterministically. Both are saved with `save_pretrained`, so they load through
`AutoModel.from_pretrained(folder)` / `AutoTokenizer.from_pretrained(folder)`,
the same code path as a hub checkpoint such as sentence-transformers/LaBSE.
"""
import argparse
import math
from collections import Counter
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import (BertConfig, BertModel, DistilBertConfig, DistilBertModel,
                          PreTrainedTokenizerFast, XLMRobertaConfig, XLMRobertaModel)

from data_loader.safe_pickle import load_pickle

VERSION = 2
MAX_LEN = 64
VOCAB_SIZE = 3000
SIZE = dict(hidden=64, layers=2, heads=4, intermediate=128)

# name -> (tokenizer family, lower-case, model family)
ENCODERS = {
    "labse-tiny": ("wordpiece", False, "bert"),
    "mbert-tiny": ("wordpiece", True, "bert"),
    "xlmr-tiny": ("unigram", False, "xlmr"),
    "distiluse-tiny": ("wordpiece", False, "distilbert"),
}
BERT_SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
XLMR_SPECIAL = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]  # XLM-R's id order


def _pieces(tok, texts):
    """Pre-tokenized words of ``texts`` under ``tok``'s normaliser and pre-tokeniser, with counts."""
    counts = Counter()
    for text in texts:
        counts.update(w for w, _ in tok.pre_tokenizer.pre_tokenize_str(tok.normalizer.normalize_str(text)))
    return counts


def _frequent(counts, limit):
    """The ``limit`` most frequent entries, ties broken by the string: the same for the same corpus.
    (The `tokenizers` trainers break ties in hash order, so their vocabularies change from run to run.)"""
    return sorted(sorted(counts), key=lambda w: -counts[w])[:max(limit, 0)]


def _wordpiece(texts, lowercase):
    """A WordPiece vocabulary of the corpus's words and characters, built deterministically."""
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    # BERT's normaliser also splits CJK characters; the uncased variant strips
    # accents too, like bert-base-multilingual-uncased.
    tok.normalizer = normalizers.BertNormalizer(lowercase=lowercase, strip_accents=lowercase)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    words = _pieces(tok, texts)
    chars = sorted({c for w in words for c in w})
    subwords = chars + [f"##{c}" for c in chars]  # any known-character word still tokenizes
    vocab = BERT_SPECIAL + subwords + [w for w in _frequent(words, VOCAB_SIZE) if w not in set(subwords)]
    vocab = vocab[:VOCAB_SIZE]
    tok.model = models.WordPiece({w: i for i, w in enumerate(vocab)}, unk_token="[UNK]")
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    return tok, dict(pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                     sep_token="[SEP]", mask_token="[MASK]")


def _unigram(texts):
    """A sentencepiece-style Unigram model over the corpus's words and characters, scored by their
    log frequency, built deterministically."""
    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.NFKC()  # as sentencepiece does by default
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    words = _pieces(tok, texts)
    chars = Counter()
    for w, n in words.items():
        for c in w:
            chars[c] += n
    # Whole words of up to 8 characters: Chinese has no spaces, so longer "words" are clauses,
    # which its characters cover instead.
    counts = chars + Counter({w: n for w, n in words.items() if len(w) <= 8})
    pieces = _frequent(counts, VOCAB_SIZE - len(XLMR_SPECIAL))
    total = sum(counts[p] for p in pieces)
    vocab = [(t, 0.0) for t in XLMR_SPECIAL] + [(p, math.log(counts[p] / total)) for p in pieces]
    tok.model = models.Unigram(vocab, unk_id=XLMR_SPECIAL.index("<unk>"), byte_fallback=False)
    bos, eos = tok.token_to_id("<s>"), tok.token_to_id("</s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>",
        special_tokens=[("<s>", bos), ("</s>", eos)])
    return tok, dict(bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
                     cls_token="<s>", sep_token="</s>", mask_token="<mask>")


def build_backbone(family, shape, max_len=512, pad_id=None):
    """A randomly initialised Hugging Face encoder: ``family`` is bert, xlmr or distilbert; ``shape``
    holds vocab_size, hidden_size, num_hidden_layers, num_attention_heads, intermediate_size."""
    if family == "bert":
        return BertModel(BertConfig(**shape, max_position_embeddings=max_len, pad_token_id=pad_id or 0))
    if family == "xlmr":
        pad_id = 1 if pad_id is None else pad_id
        # RoBERTa positions start after the padding index (514 = 512 + 2 in XLM-R).
        return XLMRobertaModel(XLMRobertaConfig(**shape, max_position_embeddings=max_len + pad_id + 1,
                                                type_vocab_size=1, pad_token_id=pad_id, bos_token_id=0,
                                                eos_token_id=2))
    if family == "distilbert":
        return DistilBertModel(DistilBertConfig(
            vocab_size=shape["vocab_size"], dim=shape["hidden_size"], n_layers=shape["num_hidden_layers"],
            n_heads=shape["num_attention_heads"], hidden_dim=shape["intermediate_size"],
            max_position_embeddings=max_len, pad_token_id=pad_id or 0))
    raise ValueError(f"unknown encoder family '{family}'")


def _build_one(name, folder, texts, seed):
    tok_family, lowercase, family = ENCODERS[name]
    tok, special = _unigram(texts) if tok_family == "unigram" else _wordpiece(texts, lowercase)
    # Only BERT takes token_type_ids; DistilBERT and XLM-R reject or ignore them.
    inputs = ["input_ids", "attention_mask"]
    if family == "bert":
        inputs.insert(1, "token_type_ids")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=MAX_LEN,
                                   model_input_names=inputs, **special)
    torch.manual_seed(seed)
    model = build_backbone(family, dict(vocab_size=tok.get_vocab_size(), hidden_size=SIZE["hidden"],
                                        num_hidden_layers=SIZE["layers"], num_attention_heads=SIZE["heads"],
                                        intermediate_size=SIZE["intermediate"]),
                           max_len=MAX_LEN, pad_id=fast.pad_token_id)
    fast.save_pretrained(folder)
    model.save_pretrained(folder)


# ---- tiny models for data preparation (feature extraction and caption translation) -------------

def build_tiny_clip(folder, image_size=32, projection_dim=16, seed=0):
    """A randomly initialised CLIP (both towers, as a hub checkpoint has) and its image processor,
    saved to ``folder``: loads like openai/clip-vit-base-patch32, at ``image_size`` pixels."""
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel
    torch.manual_seed(seed)
    tower = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    config = CLIPConfig(text_config=dict(tower, vocab_size=64, max_position_embeddings=16, bos_token_id=0,
                                         eos_token_id=1, pad_token_id=1),
                        vision_config=dict(tower, image_size=image_size, patch_size=image_size // 4),
                        projection_dim=projection_dim)
    CLIPModel(config).save_pretrained(folder)
    CLIPImageProcessorPil(size={"shortest_edge": image_size},
                          crop_size={"height": image_size, "width": image_size}).save_pretrained(folder)
    return Path(folder)


MT_SPECIAL = ["<pad>", "</s>", "<unk>"]


def _train_to_copy(model, tokenizer, words, language_ids, steps, seed):
    """``steps`` of learning to copy random sentences of ``words`` after a target-language token:
    the output then depends on the input, as a translation's does, so that a caption stored beside
    another caption's translation shows in the tests."""
    rng = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a model this small runs fastest on one thread
    model.train()
    try:
        for _ in range(steps):
            lengths = torch.randint(3, 7, (32,), generator=rng).tolist()
            sentences = [" ".join(words[k] for k in torch.randint(len(words), (n,), generator=rng).tolist())
                         for n in lengths]
            batch = tokenizer(sentences, return_tensors="pt", padding=True)
            labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
            first = torch.tensor(language_ids)[torch.randint(len(language_ids), (len(sentences), 1), generator=rng)]
            loss = model(**batch, labels=torch.cat([first, labels], dim=1)).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    finally:
        torch.set_num_threads(threads)
        model.eval()


def build_tiny_translator(folder, texts, languages, seed=0, steps=300):
    """A tiny M2M100 translation model saved to ``folder``: a ``__<lang>__`` token per language of
    ``languages`` tells it the target, as facebook/m2m100_418M; with one language it stands for a
    per-pair model such as Helsinki-NLP/opus-mt-en-de (loaded by the same Auto classes). Its fast
    tokenizer is a word-level vocabulary of ``texts`` (what the sentencepiece models are to real
    text). ``steps`` of copy training make its output a function of its input (0: random weights)."""
    from transformers import M2M100Config, M2M100ForConditionalGeneration
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    words = [w for w in _frequent(_pieces(tok, texts), VOCAB_SIZE) if w not in MT_SPECIAL]
    language_tokens = [f"__{lang}__" for lang in languages]
    vocab = MT_SPECIAL + language_tokens + words
    tok.model = models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>")
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=MAX_LEN, pad_token="<pad>",
                                   eos_token="</s>", unk_token="<unk>", additional_special_tokens=language_tokens)
    torch.manual_seed(seed)
    model = M2M100ForConditionalGeneration(M2M100Config(
        vocab_size=len(vocab), d_model=64, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128, max_position_embeddings=MAX_LEN,
        dropout=0.0, pad_token_id=0, eos_token_id=1, forced_eos_token_id=1, decoder_start_token_id=1, bos_token_id=0))
    _train_to_copy(model, fast, words, [vocab.index(t) for t in language_tokens], steps, seed)
    # Like a trained model: at least two real words, never padding or unknown words.
    model.generation_config.min_new_tokens = 2
    model.generation_config.suppress_tokens = [vocab.index("<pad>"), vocab.index("<unk>")]
    fast.save_pretrained(folder)
    model.save_pretrained(folder)
    return Path(folder)


def corpus_hash(texts):
    h = hashlib.sha256()
    for t in texts:
        h.update(t.encode("utf-8") + b"\n")
    return h.hexdigest()


def build(out_dir, corpus_texts, seed=0, names=None):
    """Build the encoders `names` (default: all of ENCODERS) into
    out_dir/<name>, reusing folders built from the same corpus and seed."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    texts = list(corpus_texts)
    digest = corpus_hash(texts)
    paths = {}
    for name in names or ENCODERS:
        folder = out_dir / name
        info = {"name": name, "seed": seed, "corpus_sha256": digest, "version": VERSION}
        try:
            if json.loads((folder / "tiny_build.json").read_text()) == info:
                paths[name] = folder
                continue
        except (OSError, ValueError):
            pass
        # Build in a temporary folder and move it into place, so a reader never
        # sees a half-written encoder.
        tmp = Path(tempfile.mkdtemp(dir=out_dir, prefix=f".{name}."))
        try:
            # A different seed per encoder, fixed by its name: building one encoder alone gives the
            # weights of a full build, which the reuse stamp takes for granted.
            _build_one(name, tmp, texts, seed * 100 + list(ENCODERS).index(name))
            (tmp / "tiny_build.json").write_text(json.dumps(info, indent=2) + "\n")
            # mkdtemp and the writers leave owner-only permissions.
            tmp.chmod(0o755)
            for f in tmp.iterdir():
                f.chmod(0o644)
            shutil.rmtree(folder, ignore_errors=True)
            os.replace(tmp, folder)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        paths[name] = folder
    return paths


def train_captions(train_pkl):
    """All training captions of a Multi-MSRVTT-style pickle, every language."""
    items = load_pickle(train_pkl)
    return [c for item in items for key, caps in item.items()
            if key.startswith("caption_") for c in caps]


def ensure_toy_assets(root="cache", n_english=None):
    """Generate Multi-Toy in root/multi_toy (with its English-rich training file of ``n_english``
    videos, default toy.N_ENGLISH) and the tiny encoders in root/encoders (both reused when up to
    date). Returns {"train": Path, "val": Path, "test": Path, "english": Path, "encoders": {name: Path}}."""
    from data_loader import toy

    root = Path(root)
    data = toy.generate(root / "multi_toy", n_english=n_english or toy.N_ENGLISH)
    encoders = build(root / "encoders", train_captions(data["train"]))
    return {**data, "encoders": encoders}


def main(argv=None):
    parser = argparse.ArgumentParser(description="Build Multi-Toy and the tiny text encoders.")
    parser.add_argument("--root", default="cache")
    args = parser.parse_args(argv)
    from transformers.utils import logging
    logging.disable_progress_bar()
    assets = ensure_toy_assets(args.root)
    for split in ("train", "val", "test", "english"):
        print(f"{split}: {assets[split]}")
    for name, path in assets["encoders"].items():
        print(f"{name}: {path}")


if __name__ == "__main__":
    main()
