"""Training order and caption draws: the epoch sampler shuffles by (seed, epoch) and drops the last
partial batch; each epoch draws one caption index per video, shared by all its languages."""
import numpy as np
import pytest

from data_loader.corpus import Corpus
from data_loader.dataset import RetrievalDataset, TextInput
from data_loader.loaders import EpochSampler
from model.model import model_from_config
from tests.conftest import toy_config
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
