"""Loaders: `BatchStream` is an endless, resumable stream of batches whose content depends only on (seed, pass,
position), split over ranks; `eval_loader` is a plain in-order DataLoader. A UserError raised while reading an
image reaches the main process as one line, from worker processes too.
"""
import math
import random
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from torch.utils.data._utils.collate import default_collate

from common import UserError


class _ItemError:
    """A UserError caught in a worker process, passed back as data so the main process raises it as one line (a
    worker's exception would come back with a traceback in its message)."""

    def __init__(self, msg):
        self.msg = msg


class _Catching(Dataset):
    """`dataset` as seen by worker processes: a UserError becomes an _ItemError."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getattr__(self, name):  # loader.dataset.classes etc. still work
        if name == 'dataset':
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __getitem__(self, i):
        try:
            return self.dataset[i]
        except UserError as e:
            return _ItemError(str(e))


def _collate(items):
    err = next((it for it in items if isinstance(it, _ItemError)), None)
    return err if err is not None else default_collate(items)


class _Loader(DataLoader):
    """A DataLoader that raises a worker's UserError in the main process."""

    def __iter__(self):
        for batch in super().__iter__():
            if isinstance(batch, _ItemError):
                raise UserError(batch.msg)
            yield batch


def eval_loader(dataset, batch_size, workers=0, rank=0, world_size=1, pad=False) -> DataLoader:
    """In-order batches of `batch_size` items (per process), last batch kept, (x, y, idx) with idx the position in
    `dataset`. With world_size > 1, rank r gets items r, r+w, r+2w, ... (every item on
    exactly one rank, so summed counts are exact); pad=True repeats items so that all ranks get the same count (for
    all_gather), the batch's idx tells the repeats apart."""
    idx = list(range(rank, len(dataset), world_size))
    if pad and world_size > 1:
        per = math.ceil(len(dataset) / world_size)
        idx += list(range(rank, len(dataset), world_size))[:per - len(idx)] or [0] * (per - len(idx))
    return _Loader(_Catching(dataset) if workers > 0 else dataset, batch_size=batch_size, sampler=idx,
                   num_workers=workers, drop_last=False, collate_fn=_collate, persistent_workers=workers > 0,
                   pin_memory=torch.cuda.is_available() and workers > 0)


@dataclass
class _Batch:
    """What a worker fetches: the items, the seed for their augmentation (None: use this process's RNGs), and the
    stream position after the batch."""
    indices: list
    seed: int
    next_pass: int
    next_pos: int


class _BatchFetcher(Dataset):
    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):  # never used for sampling; the sampler is endless
        return len(self.dataset)

    def __getitem__(self, b):
        if b.seed is not None:
            random.seed(b.seed)
            np.random.seed(b.seed % 2 ** 32)
            torch.manual_seed(b.seed)
        try:
            batch = default_collate([self.dataset[i] for i in b.indices])
        except UserError as e:
            batch = _ItemError(str(e))
        return batch, (b.next_pass, b.next_pos)


def _first(x):
    return x


class BatchStream:
    """Endless batches of `(x, y, idx)` from `dataset`, resumable.

    Pass p visits the items in the order np.random.RandomState(seed + p).permutation(n) (or 0..n-1 without shuffle);
    rank r of w takes perm[r::w], so ranks see disjoint items, and batches of batch_size // world_size items each.
    With drop_last a pass's short tail is skipped; a set smaller than one batch fills its batches from the next
    passes. state_dict() is the (pass, position) after the last batch returned, so a resumed stream returns the same
    batches. Augmentation randomness: with workers=0 the main process's RNGs (saved by the run's checkpoint); with
    workers > 0 each batch's worker RNGs are seeded from (seed, rank, pass, position), so batches are reproducible
    for any number of workers and across resumes."""

    def __init__(self, dataset, batch_size, seed, workers=0, rank=0, world_size=1, shuffle=True, drop_last=True,
                 pin_memory=False):
        if len(dataset) == 0:
            raise UserError('cannot draw batches from an empty dataset (check the split: e.g. --label_ratio 100 '
                            'leaves no unlabeled images)')
        if batch_size < world_size:
            raise UserError(f'--batch_size {batch_size} is the global batch and must be at least the number of '
                            f'processes ({world_size})')
        self.dataset, self.seed, self.workers = dataset, int(seed), int(workers)
        self.rank, self.world_size = int(rank), int(world_size)
        self.batch_size = int(batch_size)
        self.per_rank = self.batch_size // self.world_size
        self.shuffle, self.drop_last, self.pin_memory = shuffle, drop_last, pin_memory
        self.n = len(dataset)
        self.per_pass = math.ceil(self.n / self.world_size) if not drop_last else self.n // self.world_size
        if self.per_pass == 0:
            raise UserError(f'{self.n} items cannot be split over {self.world_size} processes')
        self.batches_per_pass = max(1, (self.per_pass // self.per_rank) if drop_last
                                    else math.ceil(self.per_pass / self.per_rank))
        self.pass_, self.pos = 0, 0
        self._order_cache = (None, None)
        self._it = None

    # --- which items -------------------------------------------------------------------------------------------
    def _order(self, p):
        if self._order_cache[0] != p:
            perm = np.random.RandomState((self.seed + p) % 2 ** 32).permutation(self.n) if self.shuffle \
                else np.arange(self.n)
            if not self.drop_last and self.n % self.world_size:  # pad by wrapping, as DistributedSampler does
                perm = np.concatenate([perm, perm[:self.world_size - self.n % self.world_size]])
            self._order_cache = (p, perm[self.rank::self.world_size][:self.per_pass])
        return self._order_cache[1]

    def _plan(self, p, pos):
        """The next batch after position (p, pos): (indices, start pass, start pos, next pass, next pos)."""
        b = self.per_rank
        if self.drop_last and self.per_pass >= b and pos + b > self.per_pass:
            p, pos = p + 1, 0  # skip the short tail of the pass
        start = (p, pos)
        out = []
        while len(out) < b:
            order = self._order(p)
            take = order[pos:pos + b - len(out)]
            out.extend(int(i) for i in take)
            pos += len(take)
            if pos >= len(order):
                p, pos = p + 1, 0
                if not self.drop_last:
                    break  # keep the last, short batch of the pass
        return out, start, p, pos

    def _plans(self, p, pos):
        while True:
            idx, (sp, spos), p, pos = self._plan(p, pos)
            seed = None
            if self.workers > 0:
                seed = int(np.random.SeedSequence([self.seed, self.rank, sp, spos]).generate_state(2, np.uint64)[0]
                           % 2 ** 63)
            yield _Batch(idx, seed, p, pos)

    # --- iteration ---------------------------------------------------------------------------------------------
    def __iter__(self):
        return self

    def __next__(self):
        if self.workers == 0:
            idx, _, self.pass_, self.pos = self._plan(self.pass_, self.pos)
            batch = default_collate([self.dataset[i] for i in idx])
            if self.pin_memory and torch.cuda.is_available():
                batch = _pin(batch)
            return batch
        if self._it is None:
            g = torch.Generator()
            g.manual_seed(self.seed * 1_000_003 + self.pass_)
            loader = DataLoader(_BatchFetcher(self.dataset), batch_size=None, sampler=self._plans(self.pass_, self.pos),
                                num_workers=self.workers, collate_fn=_first, pin_memory=self.pin_memory,
                                generator=g, persistent_workers=False)
            self._it = iter(loader)
        batch, state = next(self._it)
        if isinstance(batch, _ItemError):
            self.close()
            raise UserError(batch.msg)
        self.pass_, self.pos = state
        return batch

    @property
    def epoch(self):
        """Number of completed passes (the pass the next batch comes from)."""
        return self.pass_

    def state_dict(self) -> dict:
        return {'pass': self.pass_, 'pos': self.pos, 'seed': self.seed, 'n': self.n,
                'world_size': self.world_size, 'batch_size': self.batch_size}

    def load_state_dict(self, d):
        if d.get('n', self.n) != self.n:
            raise UserError(f'the checkpoint\'s data stream had {d["n"]} items, this dataset has {self.n}: resume '
                            f'with the same dataset and split')
        p, pos = int(d['pass']), int(d['pos'])
        self.seed = int(d.get('seed', self.seed))  # the checkpoint's order, so the resumed batches are the same
        old_world = int(d.get('world_size', self.world_size))
        if old_world != self.world_size:  # keep the same share of the pass (exact batches are lost anyway)
            pos = min(pos * old_world // self.world_size, self.per_pass)
        self.pass_, self.pos = p, pos
        self.close()

    def close(self):
        """Stop the worker processes (they restart at the next batch)."""
        self._it = None

    def __len__(self):
        return self.batches_per_pass


def _pin(batch):
    if isinstance(batch, torch.Tensor):
        return batch.pin_memory()
    if isinstance(batch, (list, tuple)):
        return type(batch)(_pin(b) for b in batch)
    return batch
