"""Data stage, the loader: training batches from a decode-once store (see ``cache``).

Batches are gathered from the memory-mapped store in a background thread, so the next batch is
ready while the current one trains; every rank of a DDP trial sees an equal-length shard.
"""

from __future__ import annotations

import math
import queue
import threading
from typing import TYPE_CHECKING

import numpy as np
import torch

from raysearch.errors import ConfigError, DataError

if TYPE_CHECKING:
    from raysearch.data.cache import ImageCache



class _Failed:
    def __init__(self, error: BaseException) -> None:
        self.error = error


_END = object()


class BatchLoader:
    """Training batches from a store: ``(images uint8 [B,1,S,S], labels float32 [B] or [B,K],
    rows int64 [B])`` (labels keep the shape they were given: ``[N]`` or ``[N, K]``).

    The order is a function of ``(seed, epoch)`` only (call :meth:`set_epoch`). Each rank takes an
    equal share, padded by wrapping around like ``DistributedSampler``, so DDP ranks run the same
    number of steps. A background thread gathers the next ``prefetch`` batches from the memmap
    (rows read in sorted order, then put back in sampled order).
    """

    def __init__(
        self,
        cache: ImageCache,
        rows: np.ndarray,
        labels: np.ndarray,
        *,
        batch_size: int,
        shuffle: bool,
        seed: int = 0,
        drop_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
        prefetch: int = 2,
        pin_memory: bool = False,
    ) -> None:
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        labels = np.asarray(labels, dtype=np.float32)
        labels = labels.reshape(len(labels), -1) if labels.ndim > 1 else labels.reshape(-1)
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ConfigError(
                f"rank must lie in [0, world_size), got rank={rank}, world_size={world_size}"
            )
        if len(rows) != len(labels):
            raise DataError(f"rows and labels differ in length: {len(rows)} vs {len(labels)}")
        if len(rows) and (rows.min() < 0 or rows.max() >= len(cache)):
            raise DataError(
                f"rows must lie in [0, {len(cache)}) for {cache!r}, got {rows.min()}..{rows.max()}"
            )
        self.cache, self.rows, self.labels = cache, rows, labels
        self.batch_size, self.shuffle, self.seed, self.drop_last = (
            batch_size,
            shuffle,
            seed,
            drop_last,
        )
        self.rank, self.world_size = rank, world_size
        self.prefetch, self.pin_memory = max(0, prefetch), pin_memory
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _per_rank(self) -> int:
        return math.ceil(len(self.rows) / self.world_size)

    def __len__(self) -> int:
        per = self._per_rank()
        return per // self.batch_size if self.drop_last else math.ceil(per / self.batch_size)

    def positions(self) -> np.ndarray:
        """Positions into ``rows`` that this rank visits this epoch, in order."""
        n = len(self.rows)
        if self.shuffle:
            order = np.random.default_rng([self.seed, self.epoch]).permutation(n)
        else:
            order = np.arange(n)
        total = self._per_rank() * self.world_size
        order = np.resize(order, total)  # wraps around, as DistributedSampler pads
        return order[self.rank : total : self.world_size]

    def _batch(self, pos: np.ndarray):

        rows = self.rows[pos]
        order = np.argsort(rows, kind="stable")
        images = np.empty((len(rows), 1, self.cache.image_size, self.cache.image_size), np.uint8)
        images[order, 0] = self.cache.images[rows[order]]
        out = torch.from_numpy(images), torch.from_numpy(self.labels[pos]), torch.from_numpy(rows)
        if self.pin_memory and torch.cuda.is_available():
            out = tuple(t.pin_memory() for t in out)
        return out

    def __iter__(self):
        pos = self.positions()
        bounds = range(0, len(self) * self.batch_size, self.batch_size)
        batches = [pos[i : i + self.batch_size] for i in bounds]
        if self.prefetch == 0:
            for b in batches:
                yield self._batch(b)
            return
        q: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()

        def put(item) -> bool:
            while not stop.is_set():
                try:
                    q.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        def produce() -> None:
            try:
                for b in batches:
                    if not put(self._batch(b)):
                        return
                put(_END)
            except BaseException as e:  # noqa: BLE001 - handed to the consumer, which re-raises it
                put(_Failed(e))

        thread = threading.Thread(target=produce, name="raysearch-prefetch", daemon=True)
        thread.start()
        try:
            while (item := q.get()) is not _END:
                if isinstance(item, _Failed):
                    raise item.error
                yield item
        finally:
            stop.set()
            thread.join()
