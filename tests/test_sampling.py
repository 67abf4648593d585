"""Training order and caption draws: the epoch sampler shuffles by (seed, epoch) and drops the last
partial batch; each epoch draws one caption index per video, shared by all its languages; with
data.english_only_per_batch, English-only items top up each batch of multilingual ones."""
import numpy as np
import pytest

from common.errors import ConfigError
from data_loader import toy
from data_loader.corpus import Corpus
from data_loader.dataset import RetrievalDataset, TextInput
from data_loader.loaders import EnglishTopUpSampler, EpochSampler, train_sampler
from model.model import model_from_config
from parse_config import resolve
from tests.conftest import sacred_scalars, toy_config, write_json_config
from trainer.build import build_loaders, load_corpora

N_TRAIN = 128  # training videos of the toy set in conftest, 5 captions each


def epoch_order(size, batch, seed, epoch, **kwargs):
    sampler = EpochSampler(size, batch, seed, **kwargs)
    sampler.set_epoch(epoch)
    return list(sampler)


def test_an_epoch_is_a_shuffled_permutation_of_the_items():
    order = epoch_order(64, 8, seed=5, epoch=0)
    assert sorted(order) == list(range(64))  # every item once
    assert order != list(range(64))
    assert sum(i == j for i, j in enumerate(order)) < 16  # shuffled, not a near-identity


def test_the_order_depends_on_seed_and_epoch_only():
    orders = {(seed, epoch): epoch_order(64, 8, seed, epoch) for seed in (0, 1) for epoch in range(4)}
    # a new sampler with the same seed and epoch gives the same order, bit for bit
    assert epoch_order(64, 8, 1, 2) == orders[1, 2]
    # the same sampler, moved on and back, too
    sampler = EpochSampler(64, 8, 1)
    sampler.set_epoch(3)
    list(sampler)
    sampler.set_epoch(2)
    assert list(sampler) == orders[1, 2]
    # every (seed, epoch) gives its own order
    assert len({tuple(order) for order in orders.values()}) == len(orders)
    for order in orders.values():
        assert sorted(order) == list(range(64))


def test_the_last_partial_batch_is_dropped_and_it_holds_different_items_each_epoch():
    size, batch = 10, 4
    sampler = EpochSampler(size, batch, seed=3)  # drop_last=True: the training default
    assert sampler.num_batches() == 2 and len(sampler) == 8
    dropped = []
    for epoch in range(8):
        sampler.set_epoch(epoch)
        order = list(sampler)
        assert len(order) == 8 and len(set(order)) == 8 and set(order) <= set(range(size))
        # the kept items are the first two batches of the epoch's full shuffle
        full = epoch_order(size, batch, 3, epoch, drop_last=False)
        assert sorted(full) == list(range(size)) and full[:8] == order
        dropped.append(frozenset(range(size)) - set(order))
    assert all(len(d) == 2 for d in dropped)
    assert len(set(dropped)) > 1  # not always the same two items left out
    assert len(frozenset().union(*dropped)) >= 4


def test_without_drop_last_the_partial_batch_is_kept():
    sampler = EpochSampler(10, 4, seed=3, drop_last=False)
    sampler.set_epoch(1)
    assert sampler.num_batches() == 3 and len(sampler) == 10
    assert sorted(sampler) == list(range(10))
    # evaluation's sampler: no shuffle, nothing dropped
    assert list(EpochSampler(10, 4, 0, shuffle=False, drop_last=False)) == list(range(10))


def test_ranks_take_their_slice_of_each_shuffled_global_batch():
    single = epoch_order(40, 8, seed=7, epoch=1)
    ranks = [epoch_order(40, 8, seed=7, epoch=1, rank=r, world_size=2) for r in range(2)]
    rebuilt = [i for j in range(5) for r in range(2) for i in ranks[r][4 * j:4 * j + 4]]
    assert rebuilt == single and single != list(range(40))


@pytest.fixture(scope="module")
def toy_train(toy_assets, tmp_path_factory):
    """The toy training loader of a config with a batch size (48) that does not divide its 128 items."""
    tmp = tmp_path_factory.mktemp("sampling")
    config = toy_config(toy_assets, tmp, languages=["en", "de", "zh"], seed=11, **{"data.batch_size": 48})
    corpora = load_corpora(config)
    _, tokenizer = model_from_config(config)
    train, _ = build_loaders(config, corpora, tokenizer)
    return {"config": config, "corpus": corpora["train"], "loader": train, "tokenizer": tokenizer}


def test_the_training_loader_shuffles_and_drops_the_partial_batch(toy_train):
    loader = toy_train["loader"]
    assert len(loader.dataset) == N_TRAIN
    assert len(loader) == 2  # 128 = 2 x 48 + 32: the last 32 items are left out of the epoch
    seen = {}
    for epoch in (0, 1):
        loader.set_epoch(epoch)
        batches = [batch.index.tolist() for batch in loader]
        assert [len(b) for b in batches] == [48, 48]
        flat = batches[0] + batches[1]
        assert len(set(flat)) == 96 and flat == list(loader.sampler)
        seen[epoch] = flat
    assert seen[0] != seen[1] and seen[0] != list(range(96))
    # the config's seed decides the order
    assert seen[0] == epoch_order(N_TRAIN, 48, 11, 0)
    assert seen[0] != epoch_order(N_TRAIN, 48, 12, 0)


def test_caption_draw_changes_with_the_epoch_and_is_reproducible(toy_train):
    data = toy_train["loader"].dataset
    assert data.num_captions.tolist() == [5] * N_TRAIN
    draws = []
    for epoch in range(4):
        data.set_epoch(epoch)
        draws.append(data.caption_choice.copy())
        assert ((draws[-1] >= 0) & (draws[-1] < 5)).all()
        assert [data[i].caption_index for i in range(8)] == draws[-1][:8].tolist()
    for a in range(4):
        for b in range(a + 1, 4):
            # with 5 captions, about 4 videos in 5 draw another index in another epoch
            assert (draws[a] != draws[b]).sum() > N_TRAIN // 2, (a, b)
    # every index 0..4 gets drawn
    assert set(np.concatenate(draws).tolist()) == set(range(5))
    data.set_epoch(2)
    assert (data.caption_choice == draws[2]).all()
    # a data set built afresh with the same seed draws the same; another seed draws otherwise
    same = RetrievalDataset(toy_train["corpus"], [], 8, 4, train=True, seed=11)
    other = RetrievalDataset(toy_train["corpus"], [], 8, 4, train=True, seed=12)
    for epoch in range(4):
        same.set_epoch(epoch)
        other.set_epoch(epoch)
        assert (same.caption_choice == draws[epoch]).all()
        assert (other.caption_choice != draws[epoch]).sum() > N_TRAIN // 2


def test_one_caption_index_serves_every_language_of_an_item(toy_train):
    """The aligned layout: caption k of every language translates English caption k, so a training
    item carries caption k in each language."""
    data, corpus, tok = toy_train["loader"].dataset, toy_train["corpus"], toy_train["tokenizer"]
    max_words = toy_train["config"]["data"]["max_words_train"]

    def ids(text):
        return tok(text, padding="max_length", max_length=max_words, truncation=True)["input_ids"]
    checked = 0
    for epoch in (0, 1):
        data.set_epoch(epoch)
        for i in range(0, N_TRAIN, 8):
            item = data[i]
            cap = item.caption_index
            assert cap == data.caption_choice[i]
            for lang in corpus.languages:
                row = item.text["student"][lang].input_ids.tolist()
                assert row == ids(corpus.captions[lang][i][cap]), (epoch, i, lang)
                # the check tells captions apart: another caption of this item tokenizes otherwise
                other = (cap + 1) % 5
                if corpus.captions[lang][i][other] != corpus.captions[lang][i][cap]:
                    checked += row != ids(corpus.captions[lang][i][other])
    assert checked >= 80


def test_a_language_with_fewer_captions_uses_its_last_one(toy_assets):
    from transformers import AutoTokenizer
    captions = {"en": [["a person cuts an onion", "someone washes a cup", "a woman holds a ball"]],
                "de": [["eine Person schneidet eine Zwiebel", "jemand wäscht eine Tasse"]]}
    corpus = Corpus(path="uneven", ids=["v"], features=[np.ones((3, 4), np.float32)], captions=captions)
    tok = AutoTokenizer.from_pretrained(toy_assets["encoders"]["labse-tiny"])
    data = RetrievalDataset(corpus, [TextInput("student", tok, corpus.languages)], max_words=12,
                            n_video_tokens=3, train=True, seed=0)

    def ids(text):
        return tok(text, padding="max_length", max_length=12, truncation=True)["input_ids"]
    drawn = set()
    for epoch in range(12):
        data.set_epoch(epoch)
        item = data[0]
        drawn.add(item.caption_index)
        assert item.text["student"]["en"].input_ids.tolist() == ids(captions["en"][0][item.caption_index])
        last = min(item.caption_index, 1)  # caption 2 has no German: its last caption stands in
        assert item.text["student"]["de"].input_ids.tolist() == ids(captions["de"][0][last])
        assert item.has_caption == {"en": True, "de": True}
    assert drawn == {0, 1, 2}


# ---- data.english_only_per_batch: English-only items drawn apart -----------------------------------

def top_up_batches(multilingual, english, batch, extra, seed, epoch, start_batch=0, **kwargs):
    sampler = EnglishTopUpSampler(multilingual, english, batch, extra, seed, **kwargs)
    sampler.set_epoch(epoch, start_batch)
    order = list(sampler)
    return [order[i:i + sampler.local_batch] for i in range(0, len(order), sampler.local_batch)]


MULTI, ENGLISH_ONLY = list(range(0, 40, 2)), list(range(1, 40, 2)) + list(range(40, 50))  # 20 and 30 items


def test_each_batch_holds_batch_size_multilingual_items_and_the_english_only_ones():
    for epoch in range(3):
        batches = top_up_batches(MULTI, ENGLISH_ONLY, 6, 4, seed=2, epoch=epoch)
        assert len(batches) == 3  # 20 multilingual items: three full batches of 6, the last 2 dropped
        for b in batches:
            assert len(b) == 10 and set(b[:6]) <= set(MULTI) and set(b[6:]) <= set(ENGLISH_ONLY)
        multi = [i for b in batches for i in b[:6]]
        english = [i for b in batches for i in b[6:]]
        assert len(set(multi)) == 18 and len(set(english)) == 12  # nothing twice within the epoch
    # with the batch dividing them, every multilingual item comes once per epoch
    for epoch in range(3):
        multi = [i for b in top_up_batches(MULTI, ENGLISH_ONLY, 5, 4, 2, epoch) for i in b[:5]]
        assert sorted(multi) == MULTI


def test_english_only_items_cycle_when_an_epoch_needs_more_of_them():
    batches = top_up_batches(MULTI, [100, 101, 102], 5, 2, seed=0, epoch=1)
    english = [i for b in batches for i in b[5:]]
    assert len(english) == 8
    assert english[3:6] == english[:3] and english[6:] == english[:2] and sorted(english[:3]) == [100, 101, 102]


def test_the_top_up_order_depends_on_seed_and_epoch_only():
    orders = {(s, e): top_up_batches(MULTI, ENGLISH_ONLY, 5, 4, s, e) for s in (0, 1) for e in range(3)}
    assert len({str(o) for o in orders.values()}) == len(orders)
    assert top_up_batches(MULTI, ENGLISH_ONLY, 5, 4, 1, 2) == orders[1, 2]
    # the English-only items are shuffled too, differently for every (seed, epoch)
    assert len({tuple(i for b in o for i in b[5:]) for o in orders.values()}) == len(orders)


def test_a_resumed_epoch_gives_the_remaining_top_up_batches():
    full = top_up_batches(MULTI, ENGLISH_ONLY, 5, 4, seed=3, epoch=2)
    for start in range(4):
        assert top_up_batches(MULTI, ENGLISH_ONLY, 5, 4, 3, 2, start_batch=start) == full[start:]


def test_ranks_take_their_slice_of_each_top_up_batch():
    single = top_up_batches(MULTI, ENGLISH_ONLY, 6, 4, seed=7, epoch=1)
    ranks = [top_up_batches(MULTI, ENGLISH_ONLY, 6, 4, 7, 1, rank=r, world_size=2) for r in range(2)]
    assert all(len(b) == 5 for r in ranks for b in r)
    assert [ranks[0][j] + ranks[1][j] for j in range(3)] == single
    with pytest.raises(ConfigError, match="'data.batch_size' \\+ 'data.english_only_per_batch' = 9 is not "
                                          "divisible by the 2 processes"):
        EnglishTopUpSampler(MULTI, ENGLISH_ONLY, 6, 3, 0, world_size=2)


def english_rich_corpus():
    """Five items with German, then four English-only ones (one with an empty German list)."""
    en = [[f"video {i}"] for i in range(9)]
    de = [[f"Video {i}"] for i in range(5)] + [[]] * 4
    return Corpus(path="rich.pkl", ids=[f"v{i}" for i in range(9)], features=[np.ones((2, 4), np.float32)] * 9,
                  captions={"en": en, "de": de})


def sampler_config(extra, batch=4):
    return {"seed": 0, "data": {"batch_size": batch, "english_only_per_batch": extra}}


def test_the_english_only_items_are_found_from_the_captions():
    sampler = train_sampler(english_rich_corpus(), sampler_config(2), rank=0, world_size=1)
    assert isinstance(sampler, EnglishTopUpSampler)
    assert sorted(sampler.multilingual.tolist()) == [0, 1, 2, 3, 4]
    assert sorted(sampler.english_only.tolist()) == [5, 6, 7, 8]
    assert isinstance(train_sampler(english_rich_corpus(), sampler_config(0), 0, 1), EpochSampler)


def test_a_file_without_both_kinds_of_items_is_refused():
    corpus = english_rich_corpus()
    with pytest.raises(ConfigError, match="rich.pkl: 4 English-only and 5 other training items; config key "
                                          "'data.english_only_per_batch' = 2 needs .* 'data.batch_size' = 6 others"):
        train_sampler(corpus, sampler_config(2, batch=6), 0, 1)
    corpus.captions["de"] = [["Video"]] * 9  # every item multilingual
    with pytest.raises(ConfigError, match="0 English-only and 9 other"):
        train_sampler(corpus, sampler_config(2), 0, 1)
    corpus.select_languages(["en"])  # English alone: no item has another language
    with pytest.raises(ConfigError, match="9 English-only and 0 other"):
        train_sampler(corpus, sampler_config(2), 0, 1)


def test_the_key_is_checked():
    with pytest.raises(ConfigError, match="config key 'data.english_only_per_batch' = -1 must be at least 0"):
        resolve({"data.english_only_per_batch": -1})
    with pytest.raises(ConfigError, match="config key 'data.english_only_per_batch' must be int"):
        resolve({"data.english_only_per_batch": 1.5})
    assert resolve({})["data"]["english_only_per_batch"] == 0


def test_train_py_trains_with_english_only_items_in_each_batch(toy_assets, tmp_path):
    import train as train_entry
    from data_loader.corpus import ENGLISH
    files = toy.generate(tmp_path / "rich", seed=3, n_train=32, n_test=16, n_val=16, n_english=56)
    config = toy_config(toy_assets, tmp_path, seed=4, **{
        "data.train_path": str(files["english"]), "data.batch_size": 8, "data.english_only_per_batch": 8})
    corpora = load_corpora(config)
    _, tokenizer = model_from_config(config)
    train, _ = build_loaders(config, corpora, tokenizer)
    train.set_epoch(0)
    batches = [batch.index.tolist() for batch in train]
    captions = corpora["train"].captions
    assert len(batches) == 4 and all(len(b) == 16 for b in batches)
    for b in batches:  # the training items come first in the file; the English-only ones after them
        assert all(i < 32 for i in b[:8]) and all(i >= 32 for i in b[8:])
        assert all(not captions[lang][i] for i in b[8:] for lang in captions if lang != ENGLISH)
    path = write_json_config(tmp_path, "rich", config)
    assert train_entry.main(["-c", str(path), "--run-id", "r", "-d", "cpu"]) == 0
    assert len(sacred_scalars(tmp_path / "runs" / "rich" / "r", "train.loss")) == 8  # 2 epochs of 4 steps
