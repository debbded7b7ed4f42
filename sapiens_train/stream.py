"""Streaming loader over webdataset tar shards, shared by the MAE and pose trainers.

webdataset does what it is good at:
brace expansion (`shards-{000000..000009}.tar`), opening local paths, `pipe:` commands and http(s)
URLs (`wds.gopen`), and reading tar members grouped into samples (`wds.tarfile_samples`). The
assignment of samples to ranks and workers is ours, because `split_by_node`/`split_by_worker` hand
out whole shards round-robin: with 5 shards over 4 slots one slot reads twice as much as the
others and the ranks disagree on the number of batches, which hangs a distributed job.

API
    build_stream(urls, *, decode, batch_size, num_workers, seed, rank=None, world_size=None,
                 mode="epoch" | "resampled", shuffle_buffer=1000, shard_shuffle=True, collate=None,
                 drop_last=True, batches_per_epoch=None, pin_memory=False) -> StreamLoader
    StreamLoader: `for batch in loader` (one epoch, or forever in resampled mode without
        batches_per_epoch), `loader.forever()` (epoch after epoch), `len(loader)` (batches per
        epoch per rank), `set_epoch(e)`,
        `state_dict()` / `load_state_dict(sd)`, `stats` (decoded / skipped with reasons),
        `num_samples`, `shards`.
    resolve_shards(urls) -> list[Shard]: the shard list with per-shard sample counts.

`urls` is a brace pattern, a list of URLs, a directory holding shards, or an `index.json` written
by `sapiens data pack` (local path, `pipe:` or http URL; shard names in it are relative to it).
Per-shard sample counts come from the index (also found next to local shards); without one,
local tars are counted by reading their headers and remote ones by streaming them once.
`rank` / `world_size` default to torch.distributed's when it is initialised, else 0 / 1.

`decode(sample)` receives webdataset's raw sample dict: `__key__`, `__url__`, one bytes value per
extension (`jpg`, `json`, ...) plus `__seed__` (an int that fixes the sample's augmentation) and
`__epoch__`. It returns the item to batch, or None to skip the sample. `collate(list_of_items)`
defaults to `torch.utils.data.default_collate`.

Epoch mode: exactly once, the same number of batches on every rank
    Per epoch the shard list is permuted from (seed, epoch) (unless shard_shuffle=False) and read as
    one virtual sequence of N samples. With G = world_size * batch_size, every rank yields
    L = N // G batches (drop_last=True: the last incomplete global batch, N - L*G < G samples at
    the end of that epoch's sequence, is dropped; it changes every epoch with the shard order) or
    L = ceil(N / G) (drop_last=False: the L*G - N missing samples are repeated from the start of
    the sequence, counted in `stats["repeated"]`). Rank r's batch j is made by DataLoader worker
    j % K (K = max(1, num_workers)); each (rank, worker) slot owns one contiguous range of the
    sequence, exactly the size of its batches, so slots split shards mid-way when they must and
    no sample is read by two slots. Within a slot, samples are shuffled in blocks of
    `shuffle_buffer` consecutive samples (a permutation seeded by (seed, epoch, rank, worker,
    block)). Block shuffling instead of a streaming buffer makes a position cheap to restore: a
    resume skips whole shards unread and at most one block's samples undecoded. Each worker holds
    one block of encoded samples in memory (shuffle_buffer x the mean sample size).

Resampled mode
    Each slot draws shards with replacement from (seed, epoch, rank, worker) and reads them whole,
    forever (or for `batches_per_epoch` batches per rank, then the epoch advances).

Bad data never kills or hangs the run
    A sample whose decode raises (undecodable image, missing member) is skipped with a warning
    naming its key; a shard that cannot be opened or ends early (truncated tar) has its missing
    samples skipped with a warning naming the shard. Both are counted in `stats` by reason. A
    slot that loses samples keeps reading past the end of its range (the next slot's samples,
    counted as repeated) so that every rank still yields exactly L batches. Two things raise
    instead of spinning: a worker whose first 50 decode attempts all raise (a broken `decode`,
    not bad data) and two passes over the data without one decodable sample.

Resume
    `state_dict()` -> {"epoch", "batches_in_epoch", "positions", ...}: each worker's position in
    its own sample stream after the last batch this rank yielded. `load_state_dict()` on a new
    loader built with the same arguments continues with exactly the batches an uninterrupted run
    would have produced. Positions are per rank: save each rank's state. A state saved by
    another rank is accepted (batches_in_epoch is the same on every rank) and positions are then
    recomputed assuming no sample was skipped, which is exact when none was. `for batch in
    loader` always continues from the saved position; after the epoch's last batch the loader
    moves to the next epoch by itself. `set_epoch(e)` with a new `e` starts epoch e from its
    beginning (with the current epoch it does nothing, so it is safe after `load_state_dict`).

Another number of ranks (elastic resume)
    `load_elastic_state([state of rank 0, ..., state of rank W-1])` on a loader built for the new
    world size (and possibly another batch size or number of workers) continues the saved epoch with
    the samples that no saved (rank, worker) slot had consumed: the consumed positions of every slot
    are recomputed from its saved position (its shuffle blocks are seeded, so the partly read block's
    order is known), and the remaining virtual indices, in order, become the rest of the epoch's
    sequence, split over the new slots as above. So every remaining sample is read exactly once,
    except the last < one new global batch (drop_last). Samples keep their seeds (they follow the
    virtual index), and the next epoch is laid out as usual. The saved states ride along in
    `state_dict()["rest_of_epoch"]`, so a further resume (on any world size) in the same epoch works.

DataLoader workers are started for each pass (not persistent), from a `torch.Generator` of the loader's
own (seeded by seed, epoch, rank and position): creating them never draws from the global torch RNG,
which a resumed run restores exactly.
"""

from __future__ import annotations

import bisect
import json
import logging
import math
import os
import tarfile
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
import webdataset as wds

from sapiens_lite.errors import UserError

log = logging.getLogger(__name__)

INDEX_NAME = "index.json"
DECODE_BUG_THRESHOLD = 50  # decode errors before any success that mean a broken decode, not bad data
_MASK64 = (1 << 64) - 1


@dataclass(frozen=True)
class Shard:
    url: str
    num_samples: int


# ----------------------------------------------------------------------------- shard lists


def _is_local(url: str) -> bool:
    return "://" not in url and not url.startswith("pipe:")


def _index_dir(index_url: str) -> str:
    return index_url.rsplit("/", 1)[0] + "/" if "/" in index_url else ""


def _read_index(index_url: str) -> list[Shard]:
    if _is_local(index_url) and not os.path.isfile(index_url):
        raise UserError(f"shard index {index_url} does not exist")
    try:
        with wds.gopen(index_url, "rb") as f:
            index = json.loads(f.read())
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read shard index {index_url}: {e}") from None
    if not isinstance(index, dict) or not isinstance(index.get("shards"), list):
        raise UserError(f"{index_url} is not a shard index (no 'shards' list)")
    base = _index_dir(index_url)
    shards = []
    for i, entry in enumerate(index["shards"]):
        if not isinstance(entry, dict) or "url" not in entry or "num_samples" not in entry:
            raise UserError(f"{index_url}: shards[{i}] needs 'url' and 'num_samples'")
        url = entry["url"]
        if _is_local(url) and not os.path.isabs(url):
            url = base + url  # relative to the index (a local folder, a pipe: or an http prefix)
        shards.append(Shard(url, int(entry["num_samples"])))
    return shards


def _counts_from_neighbour_index(urls: list[str]) -> dict[str, int]:
    """Counts from an index.json in the folder of local shards (written by `sapiens data pack`)."""
    counts: dict[str, int] = {}
    for folder in sorted({os.path.dirname(os.path.abspath(u)) for u in urls}):
        path = os.path.join(folder, INDEX_NAME)
        if not os.path.isfile(path):
            continue
        try:
            with open(path) as f:
                entries = json.load(f).get("shards", [])
        except (OSError, ValueError, AttributeError):
            continue
        for e in entries:
            if isinstance(e, dict) and "url" in e and "num_samples" in e:
                counts[os.path.normpath(os.path.join(folder, e["url"]))] = int(e["num_samples"])
    return counts


def _sample_key(name: str) -> str | None:
    # webdataset's rule: the key is everything before the first dot of the basename.
    d, _, base = name.rpartition("/")
    stem = base.split(".", 1)[0]
    if "." not in base or not stem:
        return None
    return f"{d}/{stem}" if d else stem


def count_samples(url: str) -> int:
    """Number of samples in one shard: tar headers for a local file, a streamed pass otherwise."""
    if _is_local(url):
        keys = set()
        try:
            with tarfile.open(url, "r:") as tf:
                for m in tf:
                    if m.isreg() and (k := _sample_key(m.name)) is not None:
                        keys.add(k)
        except (OSError, tarfile.TarError) as e:
            log.warning("shard %s: cannot count samples (%s); counting what is readable", url, e)
        return len(keys)
    n = 0
    for _ in wds.tarfile_samples([{"url": url}], handler=_warn_handler(url, Counter())):
        n += 1
    return n


def resolve_shards(urls) -> list[Shard]:
    """Expand `urls` into shards with sample counts; raises UserError if there is nothing to read."""
    if isinstance(urls, os.PathLike):
        urls = os.fspath(urls)
    if isinstance(urls, str):
        if urls.endswith(".json"):
            shards = _read_index(urls)
            if not shards:
                raise UserError(f"shard index {urls} lists no shards")
            return _nonempty(shards, urls)
        if _is_local(urls) and os.path.isdir(urls):
            if os.path.isfile(os.path.join(urls, INDEX_NAME)):
                return resolve_shards(os.path.join(urls, INDEX_NAME))
            expanded = sorted(os.path.join(urls, f) for f in os.listdir(urls) if f.endswith(".tar"))
            if not expanded:
                raise UserError(f"folder {urls} holds no .tar shards and no {INDEX_NAME}")
        else:
            expanded = list(wds.shardlists.expand_urls(urls))
        pattern = urls
    else:
        expanded = [u for x in urls for u in wds.shardlists.expand_urls(os.fspath(x))]
        pattern = ", ".join(map(str, urls)) or "[]"
    if not expanded:
        raise UserError(f"no shards match {pattern!r}")
    missing = [u for u in expanded if _is_local(u) and not os.path.isfile(u)]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise UserError(f"shard {missing[0]} does not exist{more} (from {pattern!r})")
    known = _counts_from_neighbour_index([u for u in expanded if _is_local(u)])
    shards = []
    for u in expanded:
        n = known.get(os.path.normpath(os.path.abspath(u))) if _is_local(u) else None
        shards.append(Shard(u, n if n is not None else count_samples(u)))
    return _nonempty(shards, pattern)


def _nonempty(shards: list[Shard], pattern: str) -> list[Shard]:
    kept = [s for s in shards if s.num_samples > 0]
    if not kept:
        raise UserError(f"the shards of {pattern!r} hold no samples")
    return kept


# ----------------------------------------------------------------------------- reading samples


def _warn_handler(url: str, stats: Counter) -> Callable[[Exception], bool]:
    def handler(exn: Exception) -> bool:
        log.warning("shard %s: read error, skipping what is unreadable: %s", url, exn)
        stats["read_error"] += 1
        return True  # continue: never kill the run over one bad shard

    return handler


def _read_shard(url: str, offset: int, n: int, count: int, io_stats: Counter):
    """Yield exactly `n` items: the shard's samples offset..offset+n-1, None for each missing one.

    Samples before `offset` are read as bytes and dropped (never decoded).
    """
    got = 0
    if n <= 0:
        return
    samples = wds.tarfile_samples([{"url": url}], handler=_warn_handler(url, io_stats))
    try:
        for i, sample in enumerate(samples):
            if i < offset:
                continue
            yield sample
            got += 1
            if got == n:
                return
    finally:
        samples.close()
    log.warning(
        "shard %s: expected %d samples, found %d; skipping the %d missing ones",
        url,
        count,
        offset + got,
        n - got,
    )
    for _ in range(n - got):
        yield None


def _mix(*xs: int) -> int:
    """A 63-bit hash of integers (splitmix64 rounds): cheap, stable across runs and platforms."""
    h = 0x9E3779B97F4A7C15
    for x in xs:
        h = ((h ^ (x & _MASK64)) * 0xBF58476D1CE4E5B9) & _MASK64
        h ^= h >> 31
        h = (h * 0x94D049BB133111EB) & _MASK64
        h ^= h >> 29
    return h >> 1


# ----------------------------------------------------------------------------- the per-rank plan


@dataclass
class _Plan:
    """What one rank reads in one pass; picklable, handed to DataLoader workers."""

    urls: list[str]
    counts: list[int]
    order: list[int]  # shard order of this epoch (epoch mode)
    mode: str
    epoch: int
    seed: int
    rank: int
    num_slots: int  # K: batches j of this rank come from slot j % K
    batch_size: int
    shuffle_buffer: int
    decode: Callable[[dict], Any]
    collate: Callable[[list], Any] | None
    slot_batches: list[float]  # batches still to yield, per slot (inf: forever)
    slot_main: list[float]  # samples in the slot's own range (inf in resampled mode)
    slot_start: list[int]  # epoch mode: the slot's first index in the epoch's virtual sequence
    positions: list[int]  # where each slot resumes in its own stream
    first_slot: int = 0  # DataLoader worker i plays slot (first_slot + i) % K
    seq: np.ndarray | None = None  # the rest of an epoch after an elastic resume: its virtual indices
    total: int = field(init=False)

    def __post_init__(self):
        self.total = sum(self.counts)

    # --- raw samples of one slot, in order, from stream position p

    def reader(self, slot: int, p: int, io_stats: Counter) -> Iterator[tuple[int, dict | None]]:
        if self.mode == "epoch" and self.seq is not None:
            yield from self._seq_reader(self.slot_start[slot] + p, io_stats)
        elif self.mode == "epoch":
            yield from self._epoch_reader(self.slot_start[slot] + p, io_stats)
        else:
            yield from self._resampled_reader(slot, p, io_stats)

    def _seq_reader(self, j: int, io_stats: Counter):
        """Position j of `seq` onwards (cyclic), as (virtual index + wraps x N, sample). `seq` is sorted, so
        each shard is opened once per pass; the consumed samples between wanted ones are read, not decoded."""
        counts = [self.counts[i] for i in self.order]
        starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        n_seq = len(self.seq)
        while True:
            i, wrap = j % n_seq, j // n_seq
            s = int(np.searchsorted(starts, self.seq[i], side="right")) - 1
            end = int(np.searchsorted(self.seq, starts[s + 1], side="left"))  # this shard's part of seq
            offsets = (self.seq[i:end] - starts[s]).tolist()
            first = offsets[0]
            wanted = iter(offsets)
            nxt = next(wanted)
            url = self.urls[self.order[s]]
            for k, sample in enumerate(_read_shard(url, first, offsets[-1] - first + 1, counts[s], io_stats)):
                if first + k != nxt:
                    continue
                yield int(starts[s]) + nxt + wrap * self.total, sample
                j += 1
                nxt = next(wanted, None)
                if nxt is None:
                    break

    def _epoch_reader(self, v: int, io_stats: Counter):
        counts = [self.counts[i] for i in self.order]
        starts = np.concatenate([[0], np.cumsum(counts)]).tolist()
        while True:  # cyclic: positions past N repeat the sequence (padding)
            i = v % self.total
            s = bisect.bisect_right(starts, i) - 1
            off = i - starts[s]
            n = counts[s] - off
            url = self.urls[self.order[s]]
            for sample in _read_shard(url, off, n, counts[s], io_stats):
                yield v, sample
                v += 1

    def _resampled_reader(self, slot: int, p: int, io_stats: Counter):
        rng = np.random.default_rng([self.seed, self.epoch, self.rank, slot, 0x5E5A])
        pos = 0
        while True:
            s = int(rng.integers(len(self.urls)))
            c = self.counts[s]
            if pos + c > p:
                off = max(0, p - pos)
                for sample in _read_shard(self.urls[s], off, c - off, c, io_stats):
                    yield pos + off, sample
                    off += 1
            pos += c

    # --- chunks (shuffle blocks) of a slot's stream

    def block(self, slot: int, p: int) -> tuple[int, int]:
        """The block [a, b) of the slot's stream that holds position p."""
        c, main = self.shuffle_buffer, self.slot_main[slot]
        if p < main:
            a = (p // c) * c
            return a, int(min(a + c, main))
        # Past its range a slot only pads after skipped samples: read small blocks, not a whole buffer.
        c = self.batch_size
        a = int(main) + ((p - int(main)) // c) * c
        return a, a + c

    def batches(self, slot: int) -> Iterator[tuple[Any, dict]]:
        """Yield (batch, meta) for one slot; meta carries the position and cumulative stats."""
        todo = self.slot_batches[slot]
        if todo <= 0:
            return
        p = self.positions[slot]
        stats: Counter = Counter()
        reader = self.reader(slot, self.block(slot, p)[0], stats)
        collate = self.collate or torch.utils.data.default_collate
        buf: list = []
        since_good = 0
        limit = 2 * self.total + 2 * self.shuffle_buffer  # two passes over the data
        while True:
            a, b = self.block(slot, p)
            raw = [next(reader) for _ in range(b - a)]
            if self.shuffle_buffer > 1:
                rng = np.random.default_rng([self.seed, self.epoch, self.rank, slot, a])
                perm = rng.permutation(b - a).tolist()
            else:
                perm = list(range(b - a))
            for t in range(p - a, b - a):
                p = a + t + 1
                v, sample = raw[perm[t]]
                raw[perm[t]] = (v, None)  # drop the bytes as soon as they are used
                item = self._decode(slot, v, a + t, sample, stats)
                if item is None:
                    since_good += 1
                    if since_good > limit:
                        raise RuntimeError(
                            f"no decodable sample in {since_good} samples of {len(self.urls)} shards "
                            f"(e.g. {self.urls[0]}); skip reasons: {dict(stats)}"
                        )
                    continue
                since_good = 0
                buf.append(item)
                if len(buf) == self.batch_size:
                    yield collate(buf), {"slot": slot, "pos": p, "stats": dict(stats)}
                    buf = []
                    todo -= 1
                    if todo <= 0:
                        return

    def _decode(self, slot: int, v: int, p: int, sample: dict | None, stats: Counter):
        if sample is None:
            stats["skipped"] += 1
            stats["skipped:missing"] += 1
            return None
        if self.mode == "epoch":
            sample["__seed__"] = _mix(self.seed, self.epoch, v)
        else:
            sample["__seed__"] = _mix(self.seed, self.epoch, self.rank, slot, p)
        sample["__epoch__"] = self.epoch
        key = sample.get("__key__", "?")
        try:
            item = self.decode(sample)
        except Exception as e:  # any decode failure skips the sample, never the run
            log.warning("skipping sample %s (%s): %s: %s", key, sample.get("__url__"), type(e).__name__, e)
            stats["skipped"] += 1
            stats[f"skipped:{type(e).__name__}"] += 1
            failed = stats["skipped"] - stats["skipped:missing"] - stats["skipped:decode returned None"]
            if stats["decoded"] == 0 and failed >= DECODE_BUG_THRESHOLD:
                # Not bad data but a bad decode function: stop now instead of skipping every sample.
                raise RuntimeError(
                    f"the first {failed} samples of this worker all failed to decode (last: {key} in "
                    f"{sample.get('__url__')}: {type(e).__name__}: {e}); is `decode` broken?"
                ) from e
            return None
        if item is None:
            stats["skipped"] += 1
            stats["skipped:decode returned None"] += 1
            return None
        stats["decoded"] += 1
        if p >= self.slot_main[slot] or (self.mode == "epoch" and v >= self.total):
            stats["repeated"] += 1
        return item


def _slot_batches(total: float, k: int, k_slots: int) -> float:
    """Number of batch indices j in [0, total) with j % k_slots == k."""
    if total == math.inf:
        return math.inf
    return max(0, (int(total) - k + k_slots - 1) // k_slots)


def _epoch_layout(n_seq: int, world_size: int, rank: int, k_slots: int, b: int, drop_last: bool):
    """(batches per rank, batches per slot, samples per slot, first sequence index per slot) of one epoch
    whose sequence has n_seq samples: rank r owns [r*L*b, (r+1)*L*b), split into contiguous slot ranges."""
    g = world_size * b
    total = n_seq // g if drop_last else -(-n_seq // g)
    slot_total = [_slot_batches(total, k, k_slots) for k in range(k_slots)]
    main = [n * b for n in slot_total]
    rank_start = rank * total * b
    start = [rank_start + sum(main[:k]) for k in range(k_slots)]
    return total, slot_total, main, start


def _remaining(states: list[dict], num_samples: int) -> np.ndarray:
    """The virtual indices of the saved epoch that no slot of the saved ranks (`states`, one per rank)
    had consumed, ascending."""
    s0 = states[0]
    rest = s0.get("rest_of_epoch")
    base = _remaining(rest["from"], num_samples) if rest else np.arange(num_samples, dtype=np.int64)
    taken = np.zeros(num_samples, dtype=bool)
    for st in states:
        k_slots, b, c = (
            max(1, int(st["num_workers"])),
            int(st["batch_size"]),
            max(1, int(st["shuffle_buffer"])),
        )
        _, slot_total, main, start = _epoch_layout(
            len(base), int(st["world_size"]), int(st["rank"]), k_slots, b, bool(st["drop_last"])
        )
        done = int(st["batches_in_epoch"])
        positions = {int(k): int(p) for k, p in st.get("positions", {}).items()}
        for k in range(k_slots):
            p = min(positions.get(k, _slot_batches(done, k, k_slots) * b), main[k])
            full = (p // c) * c  # whole shuffle blocks consumed
            layout = [np.arange(start[k], start[k] + full, dtype=np.int64)]
            if p > full:  # the partly read block: its first p - full items in the block's seeded order
                a, e = full, min(full + c, main[k])
                if c > 1:
                    rng = np.random.default_rng([int(st["seed"]), int(st["epoch"]), int(st["rank"]), k, a])
                    perm = rng.permutation(e - a)[: p - full]
                else:
                    perm = np.arange(p - full)
                layout.append(start[k] + a + perm.astype(np.int64))
            taken[base[np.concatenate(layout) % len(base)]] = True
    return base[~taken[base]]


class _RankDataset(torch.utils.data.IterableDataset):
    def __init__(self, plan: _Plan):
        self.plan = plan

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker = info.id if info is not None else 0
        slot = (self.plan.first_slot + worker) % self.plan.num_slots
        return self.plan.batches(slot)


def _passthrough(x):
    return x


# ----------------------------------------------------------------------------- the loader


class StreamLoader:
    """Batches of one rank; see the module docstring for the guarantees."""

    def __init__(
        self,
        shards: list[Shard],
        *,
        decode: Callable[[dict], Any],
        batch_size: int,
        num_workers: int,
        seed: int,
        rank: int,
        world_size: int,
        mode: Literal["epoch", "resampled"] = "epoch",
        shuffle_buffer: int = 1000,
        shard_shuffle: bool = True,
        collate: Callable[[list], Any] | None = None,
        drop_last: bool = True,
        batches_per_epoch: int | None = None,
        pin_memory: bool = False,
        prefetch_factor: int = 2,
    ):
        if mode not in ("epoch", "resampled"):
            raise ValueError(f"mode must be 'epoch' or 'resampled', got {mode!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        if batches_per_epoch is not None and batches_per_epoch < 1:
            raise ValueError(f"batches_per_epoch must be >= 1 or None, got {batches_per_epoch}")
        self.shards = list(shards)
        self.decode = decode
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.mode = mode
        self.shuffle_buffer = max(1, shuffle_buffer)
        self.shard_shuffle = shard_shuffle
        self.collate = collate
        self.drop_last = drop_last
        self.batches_per_epoch = batches_per_epoch
        self.pin_memory = pin_memory
        self.prefetch_factor = prefetch_factor
        self.num_samples = sum(s.num_samples for s in self.shards)
        self.epoch = 0
        self.batches_in_epoch = 0
        self._positions: dict[int, int] = {}
        self._base_stats: Counter = Counter()
        self._pass_stats: dict[int, dict] = {}
        self._rest: dict | None = (
            None  # {"epoch", "from": saved states}: this epoch's rest after an elastic resume
        )
        self._seq: np.ndarray | None = None  # its virtual indices
        if mode == "epoch" and self._epoch_batches() == 0:
            g = world_size * batch_size
            raise UserError(
                f"the shards hold {self.num_samples} samples, fewer than one global batch "
                f"(world_size {world_size} x batch_size {batch_size} = {g}); use a smaller batch or drop_last=False"
            )

    # --- sizes

    @property
    def num_slots(self) -> int:
        return max(1, self.num_workers)

    def _epoch_batches(self) -> float:
        if self.mode == "resampled":
            return math.inf if self.batches_per_epoch is None else self.batches_per_epoch
        n = len(self._seq) if self._seq is not None else self.num_samples
        return _epoch_layout(n, self.world_size, 0, 1, self.batch_size, self.drop_last)[0]

    def __len__(self) -> int:
        n = self._epoch_batches()
        if n == math.inf:
            raise TypeError("a resampled stream without batches_per_epoch has no length")
        return int(n)

    def _slot_batches(self, total: float, k: int) -> float:
        """Number of j in [0, total) with j % K == k."""
        return _slot_batches(total, k, self.num_slots)

    # --- epochs and state

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch = epoch
            self.batches_in_epoch = 0
            self._positions = {}
            self._rest, self._seq = None, None

    @property
    def stats(self) -> dict[str, int]:
        """Cumulative counts: decoded, skipped, skipped:<reason>, repeated, read_error."""
        total = Counter(self._base_stats)
        for s in self._pass_stats.values():
            total.update(s)
        return {"decoded": 0, "skipped": 0, "repeated": 0, **dict(sorted(total.items()))}

    def state_dict(self) -> dict:
        return {
            "mode": self.mode,
            "epoch": self.epoch,
            "batches_in_epoch": self.batches_in_epoch,
            "positions": {str(k): p for k, p in sorted(self._positions.items())},
            "rank": self.rank,
            "world_size": self.world_size,
            "num_workers": self.num_workers,
            "batch_size": self.batch_size,
            "seed": self.seed,
            "num_samples": self.num_samples,
            "shuffle_buffer": self.shuffle_buffer,
            "drop_last": self.drop_last,
            "rest_of_epoch": self._rest,
            "stats": self.stats,
        }

    def load_state_dict(self, state: dict) -> None:
        for key in ("mode", "world_size", "num_workers", "batch_size", "seed", "num_samples"):
            if key in state and state[key] != getattr(self, key):
                raise UserError(
                    f"the saved data position was made with {key}={state[key]!r}, this loader has "
                    f"{key}={getattr(self, key)!r}; resume with the same data settings"
                )
        self.epoch = int(state["epoch"])
        self.batches_in_epoch = int(state["batches_in_epoch"])
        if state.get("rank", self.rank) == self.rank:
            self._positions = {int(k): int(p) for k, p in state.get("positions", {}).items()}
        else:
            log.warning(
                "data state saved by rank %s loaded on rank %s: positions recomputed assuming no skipped samples",
                state.get("rank"),
                self.rank,
            )
            self._positions = {}
        self._base_stats = Counter({k: int(v) for k, v in state.get("stats", {}).items() if v})
        self._pass_stats = {}
        self._rest = state.get("rest_of_epoch")
        self._seq = _remaining(self._rest["from"], self.num_samples) if self._rest else None

    def load_elastic_state(self, states: list[dict]) -> None:
        """Continue the epoch of `states` (the `state_dict()` of every saved rank, in rank order), saved
        with another world size, batch size or number of workers: see the module docstring."""
        s0 = states[0]
        for key in ("mode", "seed", "num_samples"):
            if s0.get(key) != getattr(self, key):
                raise UserError(
                    f"the saved data position was made with {key}={s0.get(key)!r}, this loader has "
                    f"{key}={getattr(self, key)!r}; resume with the same data"
                )
        if len(states) != int(s0["world_size"]) or len({int(s["epoch"]) for s in states}) != 1:
            raise UserError("the saved data positions are not one epoch of every saved rank")
        self.epoch, self.batches_in_epoch, self._positions = int(s0["epoch"]), 0, {}
        self._pass_stats = {}
        mine = states[self.rank] if self.rank < len(states) else {}
        self._base_stats = Counter({k: int(v) for k, v in mine.get("stats", {}).items() if v})
        self._rest, self._seq = None, None
        if self.mode == "resampled":
            return  # no exactly-once promise to keep: the epoch's draws start again on the new slots
        if s0.get("rest_of_epoch") or any(int(s["batches_in_epoch"]) for s in states):
            self._rest = {"epoch": self.epoch, "from": states}
            self._seq = _remaining(states, self.num_samples)
        if self._epoch_batches() == 0:  # less than one global batch left: on to the next epoch
            self._next_epoch()

    # --- iteration

    def _plan(self) -> _Plan:
        k_slots, b = self.num_slots, self.batch_size
        total = self._epoch_batches()
        done = self.batches_in_epoch
        slot_total = [self._slot_batches(total, k) for k in range(k_slots)]
        slot_done = [self._slot_batches(done, k) for k in range(k_slots)]
        if self.mode == "epoch":
            order = list(range(len(self.shards)))
            if self.shard_shuffle:
                order = (
                    np.random.default_rng([self.seed, self.epoch, 0x5EED]).permutation(len(order)).tolist()
                )
            n_seq = len(self._seq) if self._seq is not None else self.num_samples
            _, _, main, start = _epoch_layout(n_seq, self.world_size, self.rank, k_slots, b, self.drop_last)
        else:
            order, main, start = [], [math.inf] * k_slots, [0] * k_slots
        positions = [self._positions.get(k, slot_done[k] * b) for k in range(k_slots)]
        return _Plan(
            urls=[s.url for s in self.shards],
            counts=[s.num_samples for s in self.shards],
            order=order,
            mode=self.mode,
            epoch=self.epoch,
            seed=self.seed,
            rank=self.rank,
            num_slots=k_slots,
            batch_size=b,
            shuffle_buffer=self.shuffle_buffer,
            decode=self.decode,
            collate=self.collate,
            slot_batches=[t - d for t, d in zip(slot_total, slot_done)],
            slot_main=main,
            slot_start=start,
            positions=positions,
            first_slot=done % k_slots,
            seq=self._seq,
        )

    def __iter__(self):
        total = self._epoch_batches()
        if self.batches_in_epoch >= total:
            self._next_epoch()
        self._fold_stats()
        plan = self._plan()
        if self.num_workers == 0:
            source = plan.batches(0)
        else:
            # Its own generator: the DataLoader draws its workers' base seed from it, not from the global
            # torch RNG (a resumed run creates this iterator at another point of the global stream).
            g = torch.Generator().manual_seed(_mix(self.seed, self.epoch, self.rank, self.batches_in_epoch))
            loader = torch.utils.data.DataLoader(
                _RankDataset(plan),
                generator=g,
                batch_size=None,
                num_workers=self.num_workers,
                collate_fn=_passthrough,
                pin_memory=self.pin_memory,
                prefetch_factor=self.prefetch_factor,
                persistent_workers=False,
            )
            source = iter(loader)
        for batch, meta in source:
            slot = int(meta["slot"])
            self._positions[slot] = int(meta["pos"])
            self._pass_stats[slot] = meta["stats"]
            self.batches_in_epoch += 1
            if self.batches_in_epoch >= total:
                # Advance before handing out the last batch, so a state saved now points at the next epoch.
                self._next_epoch()
                yield batch
                return
            yield batch

    def forever(self):
        """Batches across epochs without end (for step-based training loops)."""
        while True:
            yield from self

    def _fold_stats(self) -> None:
        self._base_stats = Counter(self.stats)
        self._pass_stats = {}

    def _next_epoch(self) -> None:
        self._fold_stats()
        self.epoch += 1
        self.batches_in_epoch = 0
        self._positions = {}
        self._rest, self._seq = None, None


def build_stream(
    urls,
    *,
    decode: Callable[[dict], Any],
    batch_size: int,
    num_workers: int,
    seed: int,
    rank: int | None = None,
    world_size: int | None = None,
    mode: Literal["epoch", "resampled"] = "epoch",
    shuffle_buffer: int = 1000,
    shard_shuffle: bool = True,
    collate: Callable[[list], Any] | None = None,
    drop_last: bool = True,
    batches_per_epoch: int | None = None,
    pin_memory: bool = False,
    prefetch_factor: int = 2,
) -> StreamLoader:
    """A `StreamLoader` over `urls` (pattern, list, folder or index.json); see the module docstring."""
    dist = torch.distributed
    initialised = dist.is_available() and dist.is_initialized()
    if rank is None:
        rank = dist.get_rank() if initialised else 0
    if world_size is None:
        world_size = dist.get_world_size() if initialised else 1
    shards = resolve_shards(urls)
    return StreamLoader(
        shards,
        decode=decode,
        batch_size=batch_size,
        num_workers=num_workers,
        seed=seed,
        rank=rank,
        world_size=world_size,
        mode=mode,
        shuffle_buffer=shuffle_buffer,
        shard_shuffle=shard_shuffle,
        collate=collate,
        drop_last=drop_last,
        batches_per_epoch=batches_per_epoch,
        pin_memory=pin_memory,
        prefetch_factor=prefetch_factor,
    )
