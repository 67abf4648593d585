"""Text and video encoders: attention through scaled_dot_product_attention; padding cut from text
batches, which run in buckets of similar lengths."""
import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from data_loader.batch import Tokens
from model.model import DEFAULT_BUCKET_ROWS, build_model, load_tokenizer, row_lengths, used_length


@pytest.mark.parametrize("encoder", ["labse-tiny", "xlmr-tiny", "mbert-tiny", "distiluse-tiny"])
def test_text_and_video_attention_use_sdpa(toy_assets, encoder):
    name = str(toy_assets["encoders"][encoder])
    model = build_model({"text_encoder": name, "projection_dim": 16, "width": 32, "depth": 2, "heads": 2,
                         "mlp_ratio": 1.0, "length_bucket_rows": DEFAULT_BUCKET_ROWS}, feature_dim=8).eval()
    tokens = load_tokenizer(name)(["a red car", "un chat noir sur le toit"], padding=True, return_tensors="pt",
                                  return_token_type_ids=False)
    video, mask = torch.randn(2, 5, 8), torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU]) as prof:
        model.encode_text(Tokens(**tokens))
        model.encode_video(video, mask)
    calls = sum(e.count for e in prof.key_averages() if e.key == "aten::scaled_dot_product_attention")
    text_layers = model.text.backbone.config.num_hidden_layers
    assert calls == text_layers + 2  # every text layer and both video blocks


def _text_encoder(toy_assets, encoder):
    name = str(toy_assets["encoders"][encoder])
    model = build_model({"text_encoder": name, "projection_dim": 16, "width": 32, "depth": 1, "heads": 2,
                         "mlp_ratio": 1.0, "length_bucket_rows": DEFAULT_BUCKET_ROWS}, feature_dim=8)
    return model.text, load_tokenizer(name)


def _backbone_lengths(encoder):
    """Sequence lengths the backbone is called with, recorded by a forward pre-hook."""
    seen = []
    encoder.backbone.register_forward_pre_hook(lambda module, args, kwargs: seen.append(kwargs["input_ids"].shape[1]),
                                               with_kwargs=True)
    return seen


@pytest.mark.parametrize("encoder", ["labse-tiny", "xlmr-tiny", "distiluse-tiny"])
def test_padding_after_the_longest_caption_is_cut_and_changes_nothing(toy_assets, encoder):
    """The backbone runs only up to the batch's last real token; embeddings and gradients are those
    of the whole padded batch (dropout off, so both passes compute the same function)."""
    text, tokenizer = _text_encoder(toy_assets, encoder)
    text.eval()
    captions = ["a red car", "un chat noir sur le toit de la maison", "hello"]
    tokens = tokenizer(captions, padding="max_length", max_length=40, truncation=True, return_tensors="pt",
                       return_token_type_ids=False)
    longest = int(tokens["attention_mask"].sum(1).max())
    assert longest < 40
    seen = _backbone_lengths(text)
    outputs, grads = {}, {}
    for cut in (True, False):
        text.cut_padding = cut
        text.zero_grad()
        outputs[cut] = text(tokens["input_ids"], tokens["attention_mask"])
        outputs[cut].square().sum().backward()
        grads[cut] = [p.grad.clone() for p in text.parameters() if p.grad is not None]
    assert seen == [longest, 40]
    torch.testing.assert_close(outputs[True], outputs[False], rtol=0, atol=1e-5)
    for cut_grad, full_grad in zip(grads[True], grads[False], strict=True):
        torch.testing.assert_close(cut_grad, full_grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("encoder", ["labse-tiny", "xlmr-tiny", "distiluse-tiny"])
def test_length_buckets_run_each_group_at_its_longest_caption_and_change_nothing(toy_assets, encoder):
    """Rows sorted by length run in buckets of bucket_rows rows, each cut to its own longest row;
    embeddings (in the input's row order) and gradients are those of the whole padded batch."""
    text, tokenizer = _text_encoder(toy_assets, encoder)
    text.eval()
    captions = ["un chat noir sur le toit de la maison", "a", "a red car", "hello there my friend",
                "le chien", "a man cuts an onion in the kitchen, then washes a cup"]
    tokens = tokenizer(captions, padding="max_length", max_length=40, truncation=True, return_tensors="pt",
                       return_token_type_ids=False)
    lengths = sorted(tokens["attention_mask"].sum(1).tolist())
    seen = _backbone_lengths(text)
    outputs, grads = {}, {}
    for bucket_rows, cut in ((2, True), (None, False)):
        text.bucket_rows, text.cut_padding = bucket_rows, cut
        text.zero_grad()
        outputs[cut] = text(tokens["input_ids"], tokens["attention_mask"])
        outputs[cut].square().sum().backward()
        grads[cut] = [p.grad.clone() for p in text.parameters() if p.grad is not None]
    assert seen == [lengths[1], lengths[3], lengths[5], 40]  # three buckets of two rows, then the full batch
    torch.testing.assert_close(outputs[True], outputs[False], rtol=0, atol=1e-5)
    for cut_grad, full_grad in zip(grads[True], grads[False], strict=True):
        torch.testing.assert_close(cut_grad, full_grad, rtol=1e-4, atol=1e-5)


def test_a_pooling_mask_longer_than_the_tokens_keeps_its_columns(toy_assets):
    """A converted reference teacher pools with another tokenizer's mask (docs/reference.md §2.3): columns that mask
    covers are kept even where the teacher's own tokens are padding, so its targets do not change."""
    text, tokenizer = _text_encoder(toy_assets, "xlmr-tiny")
    text.eval()
    tokens = tokenizer(["a cat", "a dog"], padding="max_length", max_length=12, return_tensors="pt",
                       return_token_type_ids=False)
    own = int(tokens["attention_mask"].sum(1).max())
    pool_mask = torch.zeros(2, 12, dtype=torch.long)
    pool_mask[:, :own + 3] = 1
    seen = _backbone_lengths(text)
    with torch.no_grad():
        cut = text(tokens["input_ids"], tokens["attention_mask"], pool_mask=pool_mask)
        text.cut_padding = False
        full = text(tokens["input_ids"], tokens["attention_mask"], pool_mask=pool_mask)
    assert seen == [own + 3, 12]
    torch.testing.assert_close(cut, full, rtol=0, atol=1e-5)
    # In buckets, each row keeps the columns its own pooling mask covers.
    tokens = tokenizer(["a cat", "a dog", "a bird", "a cow"], padding="max_length", max_length=12,
                       return_tensors="pt", return_token_type_ids=False)
    pool_mask = torch.zeros(4, 12, dtype=torch.long)
    pool_mask[0, :own + 3] = 1
    pool_mask[1:, :own] = 1
    longest = sorted(max(a, p) for a, p in zip(tokens["attention_mask"].sum(1).tolist(), pool_mask.sum(1).tolist()))
    assert longest[-1] == own + 3
    seen.clear()
    with torch.no_grad():
        text.cut_padding, text.bucket_rows = True, 2
        bucketed = text(tokens["input_ids"], tokens["attention_mask"], pool_mask=pool_mask)
        text.cut_padding = False
        full = text(tokens["input_ids"], tokens["attention_mask"], pool_mask=pool_mask)
    assert seen == [longest[1], own + 3, 12]
    torch.testing.assert_close(bucketed, full, rtol=0, atol=1e-5)


def test_used_length():
    left_padded = torch.tensor([[0, 0, 1, 1], [0, 1, 1, 1]])
    right_padded = torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0]])
    assert used_length(left_padded) == 4  # the last column holds tokens: nothing is cut
    assert used_length(right_padded) == 2
    assert used_length(right_padded, torch.tensor([[1, 1, 1, 0], [0, 0, 0, 0]])) == 3
    assert used_length(torch.zeros(2, 4)) == 1  # a batch of empty captions still runs one column
    assert row_lengths(left_padded).tolist() == [4, 4]
    assert row_lengths(right_padded).tolist() == [2, 1]
    assert row_lengths(right_padded, torch.tensor([[0, 0, 0, 0], [1, 1, 1, 0]])).tolist() == [2, 3]
    assert row_lengths(torch.zeros(2, 4)).tolist() == [0, 0]
    assert used_length(torch.zeros(0, 4)) == 1  # no rows at all


def test_all_languages_encode_as_one_batch_with_their_own_pooling_masks(toy_assets):
    """encode_text_by_language runs the captions of every language through one text-encoder call
    and gives each language the embeddings that encoding it alone (with its own pooling mask) gives."""
    name = str(toy_assets["encoders"]["xlmr-tiny"])
    model = build_model({"text_encoder": name, "projection_dim": 16, "width": 32, "depth": 1, "heads": 2,
                         "mlp_ratio": 1.0, "length_bucket_rows": 3}, feature_dim=8).eval()
    tokenizer = load_tokenizer(name)
    captions = {"en": ["a red car", "a man cuts an onion in the kitchen"],
                "fr": ["une voiture rouge", "un homme coupe un oignon"],
                "de": ["ein rotes Auto", "ein Mann schneidet eine Zwiebel in der Küche, dann spült er"]}
    texts = {lang: tokenizer(c, padding="max_length", max_length=24, truncation=True, return_tensors="pt",
                             return_token_type_ids=False) for lang, c in captions.items()}
    pool_masks = {lang: t["attention_mask"].clone() for lang, t in texts.items()}
    pool_masks["fr"][:, :20] = 1  # one language pools over more columns than its tokens
    calls = _backbone_lengths(model.text)
    with torch.no_grad():
        joined = model.encode_text_by_language(texts, pool_masks)
        assert len(calls) == 2  # 6 rows in two buckets of 3; one call per language would run three
        for lang in captions:
            alone = model.encode_text(texts[lang], pool_mask=pool_masks[lang])
            torch.testing.assert_close(joined[lang], alone, rtol=0, atol=1e-5)
        without = model.encode_text_by_language(texts)
    assert list(joined) == list(captions)
    assert (without["fr"] - joined["fr"]).abs().max() > 1e-3  # the pooling mask was used
    torch.testing.assert_close(without["de"], joined["de"], rtol=0, atol=1e-5)


@pytest.mark.parametrize("pretrained", [True, False])
def test_encoders_load_in_float32_whatever_dtype_their_config_names(toy_assets, tmp_path, pretrained):
    """A hub encoder saved in bfloat16 still trains over float32 weights (autocast does the rest)."""
    import json
    import shutil
    folder = tmp_path / "labse-bf16"
    shutil.copytree(toy_assets["encoders"]["labse-tiny"], folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "dtype": "bfloat16"}))
    model = build_model({"text_encoder": str(folder), "projection_dim": 16, "width": 32, "depth": 1, "heads": 2,
                         "mlp_ratio": 1.0, "length_bucket_rows": DEFAULT_BUCKET_ROWS}, feature_dim=8,
                         pretrained_text=pretrained)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    tokens = load_tokenizer(str(folder))(["a red car"], return_tensors="pt", return_token_type_ids=False)
    assert model.encode_text(Tokens(**tokens)).dtype == torch.float32
