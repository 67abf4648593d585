"""Evaluation precision: reported numbers do not depend on the training precision."""
import torch

from tests.conftest import toy_config
from trainer.build import build_loaders, load_corpora
from model.model import model_from_config
from trainer.evaluate import embed_eval_set


def test_evaluation_embeds_in_float32_inside_a_callers_autocast(toy_assets, tmp_path):
    config = toy_config(toy_assets, tmp_path)
    corpora = load_corpora(config, splits=("eval",))
    torch.manual_seed(0)
    model, tokenizer = model_from_config(config)
    _, loader = build_loaders(config, corpora, tokenizer)
    languages = corpora["eval"].languages
    cpu = torch.device("cpu")
    plain = embed_eval_set(model, loader, languages, cpu)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = embed_eval_set(model, loader, languages, cpu)
        # The same model under bf16 autocast gives visibly different embeddings...
        batch = next(iter(loader))
        rounded = model.encode_video(batch.video, batch.video_mask)
    assert rounded.dtype == torch.bfloat16
    # ...but evaluation ignores the caller's autocast.
    assert torch.equal(plain[1], under_autocast[1])
    for lang in languages:
        assert plain[0][lang].dtype == torch.float32
        assert torch.equal(plain[0][lang], under_autocast[0][lang])


def test_evaluation_embeds_each_language_as_encoding_it_alone_would(toy_assets, tmp_path):
    """Evaluation encodes all languages of a batch in one call; each language's embeddings are those
    of its own call, in the evaluation set's order."""
    config = toy_config(toy_assets, tmp_path)
    corpora = load_corpora(config, splits=("eval",))
    torch.manual_seed(0)
    model, tokenizer = model_from_config(config)
    model.eval()
    _, loader = build_loaders(config, corpora, tokenizer)
    languages = corpora["eval"].languages
    assert len(languages) > 1
    texts = embed_eval_set(model, loader, languages, torch.device("cpu"))[0]
    with torch.no_grad():
        alone = {lang: torch.cat([model.encode_text(batch.student[lang]) for batch in loader])
                 for lang in languages}
    for lang in languages:
        torch.testing.assert_close(texts[lang], alone[lang], rtol=0, atol=1e-5)
