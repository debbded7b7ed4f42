"""A resumable, rank-sharded loader for map-style datasets (e.g. top-down pose crops).

The engine's data protocol: any iterable of micro-batches, optionally with
`set_epoch(epoch)`, `state_dict()` and `load_state_dict(state)`, where `state_dict()` describes the
position right after the batches the engine has taken so far. `ResumableLoader` implements it on top
of a torch DataLoader (worker prefetching does not move the saved position: it counts the batches it
handed out). Streaming sources (the webdataset loader in `sapiens_train.stream`) implement the
same three methods.

On another number of ranks (an elastic resume) the engine calls `load_elastic_state(states)` with the
states of every saved rank. Here the ranks take strided shares of one seeded permutation, so what they
had consumed together is a prefix of it; the rest of the epoch is the permutation after that prefix,
shared out over the new ranks the same way (each remaining sample once, except the last < world_size
x batch_size when they do not divide).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler


class ResumableDistributedSampler(Sampler[int]):
    """This rank's share of a seeded per-epoch permutation, starting at sample `start`.

    Every rank gets the same number of indices (the tail that does not divide evenly is dropped), so
    all ranks run the same number of steps per epoch.
    """

    def __init__(
        self, num_samples: int, *, rank: int = 0, world_size: int = 1, shuffle: bool = True, seed: int = 0
    ):
        if num_samples < world_size:
            raise ValueError(f"dataset has {num_samples} samples, fewer than the {world_size} ranks")
        self.num_samples = num_samples
        self.rank, self.world_size = rank, world_size
        self.shuffle, self.seed = shuffle, seed
        self.epoch = 0
        self.start = 0
        self.offset = 0  # samples of the permutation consumed before this layout (elastic resume)

    def __len__(self) -> int:
        return (self.num_samples - self.offset) // self.world_size - self.start

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def indices(self) -> list[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.num_samples, generator=g).tolist()
        else:
            order = list(range(self.num_samples))
        order = order[self.offset :]
        per_rank = len(order) // self.world_size
        return order[self.rank : per_rank * self.world_size : self.world_size]

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices()[self.start :])


class ResumableLoader:
    """DataLoader over this rank's shard with `set_epoch` / `state_dict` / `load_state_dict`.

    Batches are full (drop_last) so every rank takes the same number of steps per epoch.
    """

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int,
        *,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
        seed: int = 0,
        num_workers: int = 0,
        collate_fn: Callable | None = None,
        pin_memory: bool = False,
    ):
        self.dataset = dataset
        self.batch_size = batch_size
        self.sampler = ResumableDistributedSampler(
            len(dataset), rank=rank, world_size=world_size, shuffle=shuffle, seed=seed
        )
        self.num_workers = num_workers
        self.collate_fn = collate_fn
        self.pin_memory = pin_memory
        self.world_size = world_size
        self.epoch = 0
        self.batches = 0  # handed out in this epoch
        if len(self) == 0:
            raise ValueError(
                f"dataset of {len(dataset)} samples gives no full batch of {batch_size} on each of {world_size} ranks"
            )

    def __len__(self) -> int:
        """Batches of this rank in the current epoch (its rest, after an elastic resume)."""
        s = self.sampler
        return (s.num_samples - s.offset) // s.world_size // self.batch_size

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self.batches, self.sampler.offset = epoch, 0, 0

    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "batches": self.batches,
            "offset": self.sampler.offset,
            "world_size": self.world_size,
            "batch_size": self.batch_size,
            "num_samples": self.sampler.num_samples,
        }

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.batches = int(state["epoch"]), int(state["batches"])
        self.sampler.offset = int(state.get("offset", 0))

    def load_elastic_state(self, states: list[dict]) -> None:
        """Continue the epoch of `states` (every saved rank's `state_dict()`), saved on another number of
        ranks or with another batch size: the new ranks share the permutation after what was consumed."""
        s0 = states[0]
        if int(s0.get("num_samples", self.sampler.num_samples)) != self.sampler.num_samples:
            raise ValueError(
                f"the saved data position is for {s0['num_samples']} samples, the dataset has "
                f"{self.sampler.num_samples}"
            )
        consumed = int(s0["batches"]) * int(s0["batch_size"]) * int(s0["world_size"])
        self.epoch, self.batches = int(s0["epoch"]), 0
        self.sampler.offset = int(s0.get("offset", 0)) + consumed
        if len(self) == 0:  # less than one batch per rank left: the next epoch
            self.set_epoch(self.epoch + 1)

    def __iter__(self) -> Iterator:
        self.sampler.set_epoch(self.epoch)
        if hasattr(self.dataset, "set_epoch"):
            # Datasets that draw augmentation from (seed, epoch, index) must see each new epoch.
            self.dataset.set_epoch(self.epoch)
        self.sampler.start = self.batches * self.batch_size
        # Its own generator: creating a DataLoader iterator would otherwise draw from the global torch
        # RNG, so a resumed run (which creates one at a different point) would drift from the original.
        seed = (self.sampler.seed * 1_000_003 + self.epoch * 10_007 + self.batches) % 2**63
        loader = DataLoader(
            self.dataset,
            generator=torch.Generator().manual_seed(seed),
            batch_size=self.batch_size,
            sampler=self.sampler,
            num_workers=self.num_workers,
            collate_fn=self.collate_fn,
            pin_memory=self.pin_memory,
            drop_last=True,
            persistent_workers=False,
        )
        for batch in loader:
            self.batches += 1
            yield batch
        # The epoch is used up; the next iteration (after set_epoch) starts the next one.
