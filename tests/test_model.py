"""Attention in every encoder goes through PyTorch's scaled_dot_product_attention."""
import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from model.model import build_model, load_tokenizer


@pytest.mark.parametrize("encoder", ["labse-tiny", "xlmr-tiny", "mbert-tiny", "distiluse-tiny"])
def test_text_and_video_attention_use_sdpa(toy_assets, encoder):
    name = str(toy_assets["encoders"][encoder])
    model = build_model({"text_encoder": name, "projection_dim": 16, "width": 32, "depth": 2, "heads": 2,
                         "mlp_ratio": 1.0}, feature_dim=8).eval()
    tokens = load_tokenizer(name)(["a red car", "un chat noir sur le toit"], padding=True, return_tensors="pt",
                                  return_token_type_ids=False)
    video, mask = torch.randn(2, 5, 8), torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU]) as prof:
        model.encode_text(dict(tokens))
        model.encode_video(video, mask)
    calls = sum(e.count for e in prof.key_averages() if e.key == "aten::scaled_dot_product_attention")
    text_layers = model.text.backbone.config.num_hidden_layers
    assert calls == text_layers + 2  # every text layer and both video blocks
