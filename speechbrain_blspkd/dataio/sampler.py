"""Random batches with little padding: length-sorted within shuffled pools.

A batch of randomly drawn clips is padded to its longest clip. On the demo's
SynthSpeech training set (clips of 0.8 to 13 s, mean 3.9 s) random batches
of 32 are 45 % real audio and 55 % padding, and the encoder-side layers pay
for every padded frame. :class:`PooledLengthSampler` shuffles the
utterances, cuts the permutation into pools of ``pool_batches`` batches,
sorts each pool by duration and cuts it into batches, then shuffles the order
of all batches: every batch holds ``batch_size`` clips of similar length
(83 % real audio on the same set with pools of 8 batches), every pool is a
random draw, and no batch is bigger than the YAML says.

Why not speechbrain's ``DynamicBatchSampler``: it buckets by duration over
the whole set and varies the number of clips per batch to fill a length
budget, so consecutive batches alternate between many short and few long
clips; measured here that made the CIF quantity loss swing (0.2 to 0.9 within
30 steps) where fixed-size random batches were stable. The pooled order keeps
the batch size fixed and the pools random (the "sort within shuffled chunks"
idea of many speech toolkits' samplers). No well-kept library offers it as a
plain ``torch`` batch sampler with ``set_epoch`` for exact resumption.

:func:`loader_kwargs` turns a stage's loader options into ``DataLoader``
arguments: the pooled sampler (``length_pooling``), speechbrain's
``DynamicBatchSampler`` (``dynamic_batching``) or plain batches.
"""

import torch


class PooledLengthSampler(torch.utils.data.Sampler):
    """Utterance order giving fixed-size batches of similar lengths.

    A plain sampler (indices, not batches): with a ``DataLoader`` of the same
    ``batch_size`` every consecutive ``batch_size`` indices form one pooled
    batch, because only the last pool can end in a short batch and that batch
    comes last. Being a plain sampler, it goes through speechbrain's
    distributed wrapper like its default random sampler (each process takes
    every ``world``-th index of the order, so its batches stay length-sorted).

    The order is a function of ``seed`` and the epoch (:meth:`set_epoch`),
    so a resumed run sees the batches of an uninterrupted one; speechbrain's
    ``Brain`` calls ``set_epoch``.

    Arguments
    ---------
    lengths : sequence of float
        Duration (or any length) of every utterance, in dataset order.
    batch_size : int
        Utterances per batch: the ``DataLoader``'s ``batch_size``.
    pool_batches : int
        Batches per pool: 1 gives plain random batches; larger gives less
        padding and less randomness in which clips share a batch.
    seed : int
        Seed of the permutations (the same on every process).

    Example
    -------
    >>> lengths = [5.0, 1.0, 4.0, 2.0, 3.0, 6.0, 1.5, 2.5]
    >>> sampler = PooledLengthSampler(lengths, 2, pool_batches=4)
    >>> sorted(sampler), len(sampler)
    ([0, 1, 2, 3, 4, 5, 6, 7], 8)
    >>> order = list(sampler)
    >>> [order[i:i + 2] for i in range(0, 8, 2)] == sampler.batches()
    True
    >>> sampler.padded_fraction() < PooledLengthSampler(
    ...     lengths, 2, pool_batches=1).padded_fraction()
    True
    """

    def __init__(self, lengths, batch_size, pool_batches=8, seed=563375142):
        self.lengths = [float(x) for x in lengths]
        if not self.lengths:
            raise ValueError("PooledLengthSampler: no utterances")
        self.batch_size = int(batch_size)
        self.pool_batches = int(pool_batches)
        if self.batch_size < 1 or self.pool_batches < 1:
            raise ValueError(
                "PooledLengthSampler: batch_size and pool_batches must "
                f"be >= 1, got {batch_size} and {pool_batches}"
            )
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch):
        """Use the permutations of ``epoch`` (called by ``Brain`` each epoch)."""
        self.epoch = int(epoch)

    def batches(self):
        """This epoch's batches (lists of indices), in order."""
        gen = torch.Generator()
        gen.manual_seed(self.seed + 1000003 * self.epoch)
        order = torch.randperm(len(self.lengths), generator=gen).tolist()
        pool = self.batch_size * self.pool_batches
        batches = []
        for start in range(0, len(order), pool):
            members = sorted(
                order[start : start + pool], key=self.lengths.__getitem__
            )
            for b in range(0, len(members), self.batch_size):
                batches.append(members[b : b + self.batch_size])
        # only the last pool can end in a short batch: it stays last, so
        # the DataLoader's consecutive chunks are exactly these batches
        short = []
        if len(batches[-1]) < self.batch_size:
            short = [batches.pop()]
        shuffle = torch.randperm(len(batches), generator=gen).tolist()
        return [batches[i] for i in shuffle] + short

    def __iter__(self):
        return iter([i for batch in self.batches() for i in batch])

    def __len__(self):
        return len(self.lengths)

    def padded_fraction(self):
        """The share of padding in this epoch's batches (0: none).

        Sum over batches of ``len(batch) * max length`` against the sum of the
        lengths: what padding to the longest clip of each batch costs.
        """
        real = padded = 0.0
        for batch in self.batches():
            values = [self.lengths[i] for i in batch]
            real += sum(values)
            padded += max(values) * len(values)
        return 1.0 - real / padded if padded else 0.0


def loader_kwargs(opts, dataset):
    """DataLoader options, with length-bucketed batches when asked.

    ``opts["dynamic_batching"]`` (a dict of
    ``speechbrain.dataio.sampler.DynamicBatchSampler`` arguments, e.g.
    ``max_batch_length`` in seconds of audio and ``num_buckets``) replaces
    ``batch_size``/``shuffle`` by a batch sampler that groups utterances of
    similar duration: far less padding than random batches (measured on
    the demo's training set: 93 % of the padded frames are real instead of
    about 41 %). ``opts["length_pooling"]`` (batches per pool, or a dict
    of ``pool_batches`` and ``seed``) keeps ``batch_size`` fixed and sorts by duration within random pools of
    that many batches instead
    (:class:`speechbrain_blspkd.dataio.sampler.PooledLengthSampler`).
    Under DDP speechbrain shards either sampler across ranks.
    ``dynamic_batching: null`` / ``length_pooling: null`` (e.g. as
    command-line overrides, which merge into the YAML mapping) fall back
    to ``batch_size``/``shuffle``.

    Arguments
    ---------
    opts : dict
        The stage's ``*_dataloader_opts``.
    dataset : speechbrain.dataio.dataset.DynamicItemDataset
        Dataset whose rows have a ``duration``.

    Returns
    -------
    dict
        Keyword arguments for ``Brain.fit``'s loader.

    Example
    -------
    >>> loader_kwargs({"batch_size": 4}, None)
    {'batch_size': 4}
    """
    opts = dict(opts)
    dynamic = opts.pop("dynamic_batching", None)
    pooling = opts.pop("length_pooling", None)
    if dynamic and pooling:
        raise ValueError(
            "loader options: set dynamic_batching or length_pooling, not both"
        )
    if pooling:
        if "batch_size" not in opts:
            raise ValueError("loader options: length_pooling needs batch_size")
        for key in ("shuffle", "sampler"):
            opts.pop(key, None)
        lengths = [_duration(dataset.data[uid]) for uid in dataset.data_ids]
        if not isinstance(pooling, dict):  # the number of batches per pool
            pooling = {"pool_batches": int(pooling)}
        # a plain sampler with the loader's batch size (not a batch
        # sampler): under DDP speechbrain splits it like its own
        opts["sampler"] = PooledLengthSampler(
            lengths, opts["batch_size"], **dict(pooling)
        )
        return opts
    if not dynamic:
        return opts
    from speechbrain.dataio.sampler import DynamicBatchSampler

    for key in ("batch_size", "shuffle", "sampler"):
        opts.pop(key, None)
    opts["batch_sampler"] = DynamicBatchSampler(
        dataset, length_func=_duration, **dict(dynamic)
    )
    return opts


def _duration(row):
    return float(row["duration"])
