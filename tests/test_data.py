"""The restricted unpickler, the released-layout reader and the data set."""
import os
import pickle

import numpy as np
import pytest
import torch

from data_loader.dataset import EnglishReading, RetrievalDataset, TextInput, clean_caption, video_tokens
from data_loader.readers import read_corpus
from data_loader.safe_pickle import DataFileError, load_pickle


class Hostile:
    """Unpickling this would run a shell command that creates a marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_hostile_pickle_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps([{"id": "x", "payload": Hostile(marker)}]))
    with pytest.raises(DataFileError, match=r"refused global (posix|os)\.system") as info:
        load_pickle(path)
    assert "\n" not in str(info.value)
    assert not marker.exists()


def test_truncated_and_missing_pickles_give_one_line_errors(tmp_path):
    path = tmp_path / "cut.pkl"
    path.write_bytes(pickle.dumps([{"a": np.zeros(3)}])[:-7])
    with pytest.raises(DataFileError, match="not a readable pickle"):
        load_pickle(path)
    with pytest.raises(DataFileError, match="file not found"):
        load_pickle(tmp_path / "nope.pkl")


def released_items(training, n=3, dim=8, frames=(4, 0, 6)):
    """Items in the released Multi-MSRVTT layout (docs/reference.md §1.2)."""
    rng = np.random.default_rng(0)
    items = []
    for i in range(n):
        item = {"id": f"video{i}", "2d": rng.normal(size=(frames[i % len(frames)], dim)).astype(np.float64),
                "audio": np.zeros((40, 10))}
        if training:
            item["caption_en"] = [f"a cat number {i}", f"a dog number {i}"]
            item["caption_de"] = [f"eine Katze Nummer {i}", f"ein Hund Nummer {i}"]
            item["caption_zh"] = [f"猫 {i}", f"狗 {i}"]
        else:
            item["eval_caption_en"] = f"a cat number {i}"
            item["eval_caption_de"] = f"eine Katze Nummer {i}"
        items.append(item)
    return items


def test_reader_on_released_training_layout(tmp_path):
    path = tmp_path / "train.pkl"
    path.write_bytes(pickle.dumps(released_items(training=True), protocol=4))
    corpus = read_corpus(path, "multi-msrvtt", "2d", "train")
    assert corpus.ids == ["video0", "video1", "video2"]
    assert corpus.languages == ["en", "de", "zh"]  # English first, then sorted
    assert corpus.captions["zh"][1] == ["猫 1", "狗 1"]
    assert corpus.features[0].dtype == np.float32 and corpus.features[0].shape == (4, 8)
    assert corpus.features[1].shape == (0, 8)
    assert corpus.feature_dim == 8


def test_reader_on_released_eval_layout(tmp_path):
    path = tmp_path / "test.pkl"
    path.write_bytes(pickle.dumps(released_items(training=False), protocol=4))
    corpus = read_corpus(path, "multi-msrvtt", "2d", "eval")
    assert corpus.languages == ["en", "de"]
    assert corpus.captions["de"][2] == ["eine Katze Nummer 2"]


def test_reader_errors_name_file_key_and_language(tmp_path):
    path = tmp_path / "train.pkl"
    path.write_bytes(pickle.dumps(released_items(training=True), protocol=4))
    with pytest.raises(DataFileError, match=r"train.pkl: item 0 has no feature key 's3d'"):
        read_corpus(path, "multi-msrvtt", "s3d", "train")
    with pytest.raises(DataFileError, match=r"no captions for language\(s\) sw"):
        read_corpus(path, "multi-msrvtt", "2d", "train").select_languages(["en", "sw"])
    with pytest.raises(DataFileError, match="no 'eval_caption_<lang>' keys"):
        read_corpus(path, "multi-msrvtt", "2d", "eval")
    wrong = tmp_path / "dict.pkl"
    wrong.write_bytes(pickle.dumps({"not": "a list"}))
    with pytest.raises(DataFileError, match="expected a list of dicts"):
        read_corpus(wrong, "multi-msrvtt", "2d", "train")
    wrong.write_bytes(pickle.dumps([{"caption_en": ["a"]}, "not an item"]))
    with pytest.raises(DataFileError, match="expected a list of dicts .*, but item 1 is a str"):
        read_corpus(wrong, "multi-msrvtt", "2d", "train")


def test_an_item_without_a_language_has_no_caption_in_it(tmp_path):
    """As in the other layouts: the language is kept, and that item alone has no caption in it."""
    items = released_items(training=True)
    del items[1]["caption_de"]
    path = tmp_path / "train.pkl"
    path.write_bytes(pickle.dumps(items, protocol=4))
    corpus = read_corpus(path, "multi-msrvtt", "2d", "train", languages=["en", "de"])
    assert corpus.languages == ["en", "de"]
    assert corpus.captions["de"][1] == [] and corpus.captions["en"][1] == items[1]["caption_en"]
    assert corpus.captions["de"][0] == items[0]["caption_de"]
    items[1]["caption_de"] = None  # the key present, with no caption: the same
    path.write_bytes(pickle.dumps(items, protocol=4))
    assert read_corpus(path, "multi-msrvtt", "2d", "train").captions["de"][1] == []
    items[0]["caption_de"] = items[0]["caption_de"][:-1]
    path.write_bytes(pickle.dumps(items, protocol=4))
    with pytest.raises(DataFileError, match=f"item {items[0]['id']} has {len(items[0]['caption_de'])} "
                                            "'caption_de' captions but .* 'caption_"):
        read_corpus(path, "multi-msrvtt", "2d", "train")


def test_video_tokens_truncate_normalise_and_pad():
    feats = np.arange(12, dtype=np.float32).reshape(4, 3) + 1
    tokens, mask = video_tokens(feats, 3)
    assert mask.tolist() == [True, True, True]
    assert torch.allclose(tokens.norm(dim=1), torch.ones(3))
    assert torch.allclose(tokens[0], torch.tensor([1.0, 2, 3]) / np.sqrt(14))
    tokens, mask = video_tokens(feats[:2], 5)
    assert mask.tolist() == [True, True, False, False, False]
    assert tokens[2:].abs().sum() == 0
    tokens, mask = video_tokens(np.zeros((0, 3), np.float32), 2)
    assert not mask.any()


class CountingTokenizer:
    """Wraps a tokenizer and counts how many captions it was asked to encode."""

    def __init__(self, inner):
        self.inner, self.calls, self.texts = inner, 0, 0

    def __call__(self, texts, **kwargs):
        self.calls += 1
        self.texts += len(texts)
        return self.inner(texts, **kwargs)


def test_captions_are_tokenized_once_and_caption_index_is_shared(tmp_path, toy_assets):
    from transformers import AutoTokenizer
    path = tmp_path / "train.pkl"
    path.write_bytes(pickle.dumps(released_items(training=True), protocol=4))
    corpus = read_corpus(path, "multi-msrvtt", "2d", "train")
    tok = CountingTokenizer(AutoTokenizer.from_pretrained(toy_assets["encoders"]["labse-tiny"]))
    data = RetrievalDataset(corpus, [TextInput("student", tok, corpus.languages)], max_words=12,
                            n_video_tokens=5, train=True, seed=1)
    assert tok.calls == 3 and tok.texts == 3 * 2 * 3  # one call per language, every caption once
    for epoch in range(3):
        data.set_epoch(epoch)
        for i in range(len(data)):
            item = data[i]
            cap = item.caption_index
            for lang in corpus.languages:  # one caption index, the same translation in every language
                expected = tok.inner(corpus.captions[lang][i][cap], padding="max_length", max_length=12,
                                     truncation=True)["input_ids"]
                assert item.text["student"][lang].input_ids.tolist() == expected, (lang, i, epoch)
    assert tok.calls == 3  # reading items over three epochs tokenized nothing more
    data.set_epoch(7)
    first = data.caption_choice.copy()
    data.set_epoch(7)
    assert (first == data.caption_choice).all()


def test_clean_caption_keeps_words_only():
    assert clean_caption("A man, cutting an onion! (in the kitchen's corner)") == \
        "A man cutting an onion in the kitchen's corner"


@pytest.mark.parametrize("clean_english", [False, True])
def test_clean_english_cleans_english_captions_only(toy_assets, clean_english):
    from transformers import AutoTokenizer
    from data_loader.corpus import Corpus
    captions = {"en": [["A dog, running!"]], "de": [["Ein Hund, rennend!"]]}
    corpus = Corpus(path="punctuated", ids=["a"], features=[np.ones((3, 4), np.float32)], captions=captions)
    tok = AutoTokenizer.from_pretrained(toy_assets["encoders"]["labse-tiny"])
    data = RetrievalDataset(corpus, [TextInput("student", tok, corpus.languages, EnglishReading(clean_english, clean_english))], max_words=12,
                            n_video_tokens=3, train=True)
    item = data[0].text["student"]

    def ids(text):
        return tok(text, padding="max_length", max_length=12, truncation=True)["input_ids"]
    english = clean_caption(captions["en"][0][0]) if clean_english else captions["en"][0][0]
    assert item["en"].input_ids.tolist() == ids(english)
    assert item["de"].input_ids.tolist() == ids(captions["de"][0][0])  # other languages as written
    assert ids("A dog running") != ids("A dog, running!")  # the tokenizer does see the punctuation


def test_evaluation_ranks_each_caption_once_when_languages_have_different_counts(toy_assets):
    from transformers import AutoTokenizer
    from data_loader.corpus import Corpus
    corpus = Corpus(path="uneven", ids=["a", "b"], features=[np.ones((3, 4), np.float32)] * 2,
                    captions={"en": [["a dog", "a brown dog"], ["a cat"]], "de": [["ein Hund"], ["eine Katze"]]})
    tok = AutoTokenizer.from_pretrained(toy_assets["encoders"]["labse-tiny"])
    data = RetrievalDataset(corpus, [TextInput("student", tok, corpus.languages)], max_words=8,
                            n_video_tokens=3, train=False)
    flags = [(data[i].index, data[i].caption_index, data[i].has_caption) for i in range(len(data))]
    # Video a has two English captions and one German one: its second pair is English only.
    assert flags == [(0, 0, {"en": True, "de": True}), (0, 1, {"en": True, "de": False}),
                     (1, 0, {"en": True, "de": True})]


@pytest.mark.parametrize("size,batch,world,drop_last", [(5, 2, 1, False), (11, 4, 2, False), (11, 4, 2, True),
                                                        (7, 4, 2, False), (12, 6, 3, False)])
def test_sampler_length_is_what_it_yields(size, batch, world, drop_last):
    from data_loader.loaders import EpochSampler
    for rank in range(world):
        for start in (0, 1):
            sampler = EpochSampler(size, batch, 0, shuffle=False, drop_last=drop_last, rank=rank, world_size=world)
            sampler.set_epoch(0, start_batch=start)
            assert len(sampler) == len(list(sampler))


def test_inference_reads_a_training_file_and_reports_its_own_errors(tmp_path):
    from utils.inference import read_videos
    path = tmp_path / "train.pkl"
    path.write_bytes(pickle.dumps(released_items(training=True), protocol=4))
    assert len(read_videos(path, "multi-msrvtt", "2d")) == len(released_items(training=True))
    with pytest.raises(DataFileError, match=r"train.pkl: item 0 has no feature key 's3d'"):
        read_videos(path, "multi-msrvtt", "s3d")


def test_inference_reads_a_safe_folder_whatever_layout_the_checkpoint_names(tmp_path, toy_assets):
    from data_loader import convert
    from utils.inference import read_videos
    assert convert.main([str(toy_assets["test"]), str(tmp_path / "safe")]) == 0
    pickled = read_videos(toy_assets["test"], "multi-msrvtt", "2d")
    safe = read_videos(tmp_path / "safe", "multi-msrvtt", "2d")
    assert safe.ids == pickled.ids and safe.captions == pickled.captions


def test_data_tools_start_without_torch():
    import subprocess
    import sys
    from pathlib import Path
    code = ("import sys, data_loader.check, data_loader.convert, data_loader.toy; "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1],
                         capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"  # check and convert are run on data before any training


def batch_tensors(batch):
    """Every tensor of a Batch, in field order."""
    tokens = [t for per_lang in batch.text.values() for tok in per_lang.values()
              for t in (tok.input_ids, tok.attention_mask)]
    return [batch.index, batch.caption_index, batch.video, batch.video_mask, *tokens, *batch.has_caption.values()]


def test_a_batch_stacks_its_items_moves_whole_and_splits_into_the_batches_of_its_parts(toy_assets):
    from transformers import AutoTokenizer
    from data_loader.batch import STUDENT, collate
    from data_loader.corpus import Corpus
    captions = {"en": [["a dog"], ["a cat"], [], ["a cow"]], "de": [["ein Hund"], [], ["eine Katze"], ["eine Kuh"]]}
    corpus = Corpus(path="four", ids=["a", "b", "c", "d"], captions=captions,
                    features=[np.full((k + 1, 4), k + 1, np.float32) for k in range(4)])
    tok = AutoTokenizer.from_pretrained(toy_assets["encoders"]["labse-tiny"])
    data = RetrievalDataset(corpus, [TextInput(STUDENT, tok, corpus.languages)], max_words=8, n_video_tokens=3,
                            train=False)
    items = [data[i] for i in range(len(data))]
    batch = collate(items)
    assert len(batch) == 4 and batch.index.tolist() == [0, 1, 2, 3] and batch.caption_index.tolist() == [0] * 4
    assert {lang: m.tolist() for lang, m in batch.has_caption.items()} == \
        {"en": [True, True, False, True], "de": [True, False, True, True]}
    assert batch.video_mask.sum(1).tolist() == [1, 2, 3, 3] and batch.video.shape == (4, 3, 4)
    for i, item in enumerate(items):
        for lang in corpus.languages:
            assert torch.equal(batch.student[lang].input_ids[i], item.text[STUDENT][lang].input_ids)
            assert torch.equal(batch.student[lang].attention_mask[i], item.text[STUDENT][lang].attention_mask)
    assert all(t.device.type == "meta" for t in batch_tensors(batch.to("meta")))
    for part, part_items in zip(batch.split(2), (items[:2], items[2:]), strict=True):
        expected = batch_tensors(collate(part_items))
        assert all(torch.equal(a, b) for a, b in zip(batch_tensors(part), expected, strict=True))
