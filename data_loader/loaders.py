"""From the ``data`` section of a config to checked corpora and DataLoaders."""

import torch
from torch.utils.data import DataLoader, Sampler

from data_loader.batch import collate
from data_loader.corpus import ENGLISH, check_items
from data_loader.readers import read_corpus
from data_loader.dataset import RetrievalDataset
from data_loader.safe_pickle import DataFileError
from common.errors import ConfigError


def load_split(config, split):
    """The train or eval corpus named by the config, checked against it, restricted to its languages.
    Every check runs here, before a model is built or a step is trained."""
    data = config["data"]
    path = data["train_path"] if split == "train" else data["eval_path"]
    if not path:
        raise DataFileError(f"config key 'data.{split}_path' is not set")
    corpus = read_corpus(path, data["layout"], data["feature_key"], split, languages=config["languages"],
                         missing_caption_fallback=data["missing_caption_fallback"],
                         student_english=data["student_english"])
    wrong = [(i, f.shape[1]) for i, f in enumerate(corpus.features) if f.ndim == 2 and f.shape[1] != data["feature_dim"]]
    if wrong:
        i, dim = wrong[0]
        where = "" if len(wrong) == len(corpus) else f" in item {corpus.ids[i]} ({len(wrong)} item(s) in all)"
        raise DataFileError(f"{path}: feature '{data['feature_key']}' has dimension {dim}{where}, "
                            f"but config key 'data.feature_dim' is {data['feature_dim']}")
    check_items(corpus, allow_duplicate_ids=data["allow_duplicate_ids"])
    if split == "train" and len(corpus) < data["batch_size"]:
        # Every step takes a full global batch (the last partial one is dropped): no step would run.
        raise ConfigError(f"{path}: {len(corpus)} training items, fewer than config key 'data.batch_size' = "
                          f"{data['batch_size']}; lower the batch size")
    total = config["eval"]["total_queries"]
    if split == "eval" and total is not None:  # only with eval.multi_caption = average (parse_config)
        lang, queries = max(videos_with_captions(corpus).items(), key=lambda kv: kv[1])
        if total < queries:
            raise ConfigError(f"config key 'eval.total_queries' = {total} is smaller than the {queries} queries "
                              f"that {path} gives in language '{lang}'; set it to at least {queries}, or to null")
    return corpus


def videos_with_captions(corpus):
    """{language: videos (unique ids) with a caption in it}: the queries evaluation ranks when the
    captions of a video are averaged into one."""
    return {lang: len({vid for vid, caps in zip(corpus.ids, corpus.captions[lang]) if caps})
            for lang in corpus.languages}


class GlobalBatchSampler(Sampler):
    """Indices of one epoch in global batches, which the ranks split.

    Each rank takes its slice of every global batch, in rank order, so gathering the ranks' slices
    rebuilds exactly the batch that one process would see. ``set_epoch`` picks the epoch, whose
    shuffles are seeded by (seed, epoch); ``start_batch`` skips batches already trained on
    (mid-epoch resume). A subclass says how many global batches an epoch has, how long each is, and
    which indices they hold.
    """

    def __init__(self, global_batch_size, seed, rank, world_size, batch_keys):
        if global_batch_size % world_size:
            raise ConfigError(f"config {batch_keys} = {global_batch_size} is not divisible by the "
                              f"{world_size} processes")
        self.global_batch, self.seed, self.rank, self.world_size = global_batch_size, seed, rank, world_size
        self.local_batch = global_batch_size // world_size
        self.epoch, self.start_batch = 0, 0

    def set_epoch(self, epoch, start_batch=0):
        self.epoch, self.start_batch = epoch, start_batch

    def num_batches(self):
        raise NotImplementedError

    def batch_length(self, j):
        """Items in global batch ``j``."""
        return self.global_batch

    def global_batches(self):
        """The epoch's remaining global batches, each a tensor of indices."""
        raise NotImplementedError

    def epoch_generator(self):
        """The random generator of this epoch's shuffles."""
        return torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)

    def _rank_part(self, length):
        """(start, stop) of this rank's slice of a global batch of ``length`` items."""
        per_rank = -(-length // self.world_size)
        return min(length, self.rank * per_rank), min(length, (self.rank + 1) * per_rank)

    def __iter__(self):
        for batch in self.global_batches():
            start, stop = self._rank_part(len(batch))
            yield from batch[start:stop].tolist()

    def __len__(self):
        parts = (self._rank_part(self.batch_length(j)) for j in range(self.start_batch, self.num_batches()))
        return sum(stop - start for start, stop in parts)


class EpochSampler(GlobalBatchSampler):
    """Every index once per epoch, shuffled by (seed, epoch): global batch ``j`` is
    ``order[j*B:(j+1)*B]``, the last partial one kept unless ``drop_last``."""

    def __init__(self, size, global_batch_size, seed, shuffle=True, drop_last=True, rank=0, world_size=1):
        super().__init__(global_batch_size, seed, rank, world_size, batch_keys="key 'data.batch_size'")
        self.size, self.shuffle, self.drop_last = size, shuffle, drop_last

    def num_batches(self):
        full, rest = divmod(self.size, self.global_batch)
        return full if self.drop_last or not rest else full + 1

    def batch_length(self, j):
        return min((j + 1) * self.global_batch, self.size) - j * self.global_batch

    def global_batches(self):
        order = torch.randperm(self.size, generator=self.epoch_generator()) if self.shuffle else torch.arange(self.size)
        for j in range(self.start_batch, self.num_batches()):
            yield order[j * self.global_batch:(j + 1) * self.global_batch]


class EnglishTopUpSampler(GlobalBatchSampler):
    """Global batches of ``batch_size`` multilingual items plus ``english_per_batch`` English-only ones.

    An epoch is one pass over the multilingual items, shuffled by (seed, epoch), the last partial
    batch dropped. The English-only items follow in their own (seed, epoch) shuffle, cycled when an
    epoch needs more of them. So every non-English contrastive term contrasts as many videos as in
    translate-train, while English sees the extra videos.
    """

    def __init__(self, multilingual, english_only, batch_size, english_per_batch, seed, rank=0, world_size=1):
        super().__init__(batch_size + english_per_batch, seed, rank, world_size,
                         batch_keys="keys 'data.batch_size' + 'data.english_only_per_batch'")
        self.multilingual, self.english_only = torch.as_tensor(multilingual), torch.as_tensor(english_only)
        self.batch_size, self.english_per_batch = batch_size, english_per_batch

    def num_batches(self):
        return len(self.multilingual) // self.batch_size

    def global_batches(self):
        g = self.epoch_generator()
        multilingual = self.multilingual[torch.randperm(len(self.multilingual), generator=g)]
        english = self.english_only[torch.randperm(len(self.english_only), generator=g)]
        B, E = self.batch_size, self.english_per_batch
        for j in range(self.start_batch, self.num_batches()):
            cycled = torch.arange(j * E, (j + 1) * E) % len(english)
            yield torch.cat([multilingual[j * B:(j + 1) * B], english[cycled]])


class TrainLoader(DataLoader):
    """The training DataLoader, with the epoch controls a training loop needs."""

    def set_epoch(self, epoch, start_batch=0):
        """Draw ``epoch``'s order and caption choice; skip its first ``start_batch`` batches (mid-epoch resume)."""
        self.sampler.set_epoch(epoch, start_batch=start_batch)
        self.dataset.set_epoch(epoch)

    def batches_per_epoch(self):
        return self.sampler.num_batches()

    @property
    def local_batch(self):
        """Items per batch in this process."""
        return self.sampler.local_batch

    def item_ids(self, index):
        """The corpus ids of the items at positions ``index`` (a tensor, e.g. ``Batch.index``)."""
        return [self.dataset.corpus.ids[i] for i in index.tolist()]


def make_loader(dataset, batch_size, sampler, num_workers, seed, loader_class=DataLoader):
    return loader_class(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                        pin_memory=torch.cuda.is_available(), drop_last=False, collate_fn=collate,
                        # A private generator keeps the global RNG (dropout) untouched by the loader,
                        # which makes resumed runs continue bit for bit.
                        generator=torch.Generator().manual_seed(seed),
                        persistent_workers=False)


def train_loader(corpus, text_inputs, config, rank=0, world_size=1):
    data = config["data"]
    dataset = RetrievalDataset(corpus, text_inputs, data["max_words_train"], data["n_video_tokens"],
                               train=True, seed=config["seed"])
    sampler = train_sampler(corpus, config, rank, world_size)
    return make_loader(dataset, sampler.local_batch, sampler, data["num_workers"], config["seed"], TrainLoader)


def train_sampler(corpus, config, rank, world_size):
    """EpochSampler over every item, or, with data.english_only_per_batch > 0, EnglishTopUpSampler."""
    data = config["data"]
    english_per_batch = data["english_only_per_batch"]
    if not english_per_batch:
        return EpochSampler(len(corpus), data["batch_size"], config["seed"], rank=rank, world_size=world_size)
    others = [lang for lang in corpus.languages if lang != ENGLISH]
    multilingual = [i for i in range(len(corpus)) if any(corpus.captions[lang][i] for lang in others)]
    english_only = sorted(set(range(len(corpus))) - set(multilingual))
    if not english_only or len(multilingual) < data["batch_size"]:
        raise ConfigError(f"{corpus.path}: {len(english_only)} English-only and {len(multilingual)} other training "
                          f"items; config key 'data.english_only_per_batch' = {english_per_batch} needs at least "
                          f"one English-only item and 'data.batch_size' = {data['batch_size']} others")
    return EnglishTopUpSampler(multilingual, english_only, data["batch_size"], english_per_batch, config["seed"],
                               rank=rank, world_size=world_size)


def eval_loader(corpus, text_inputs, config, rank=0, world_size=1):
    data = config["data"]
    dataset = RetrievalDataset(corpus, text_inputs, data["max_words_eval"], data["n_video_tokens"], train=False)
    sampler = EpochSampler(len(dataset), data["eval_batch_size"] * world_size, 0, shuffle=False,
                           drop_last=False, rank=rank, world_size=world_size)
    return make_loader(dataset, data["eval_batch_size"], sampler, data["num_workers"], config["seed"])
