"""The streaming loader: exactly-once epochs, equal batch counts per rank, resume, bad data, URL kinds.

Shards here hold tiny text members (`KEY.txt`), except where images are needed; `decode` returns the
key, so a batch is a list of keys and every test can account for every sample.
"""

from __future__ import annotations

import functools
import http.server
import io
import json
import logging
import multiprocessing
import os
import socket
import threading
from collections import Counter

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from sapiens_lite.errors import UserError
from sapiens_train.stream import build_stream, resolve_shards

SIZES = [7, 3, 11, 5, 9]  # uneven on purpose: 35 samples in 5 shards


def make_shards(folder, sizes=SIZES, index=True, image=False):
    os.makedirs(folder, exist_ok=True)
    entries = []
    for i, n in enumerate(sizes):
        name = f"shard-{i:06d}.tar"
        with wds.TarWriter(os.path.join(folder, name), encoder=False, mtime=0) as w:
            for j in range(n):
                sample = {"__key__": f"s{i}_{j:03d}", "txt": f"{i}/{j}".encode()}
                if image:
                    sample["jpg"] = _jpeg(i * 100 + j)
                w.write(sample)
        entries.append({"url": name, "num_samples": n})
    if index:
        with open(os.path.join(folder, "index.json"), "w") as f:
            json.dump({"shards": entries}, f)
    return [os.path.join(folder, e["url"]) for e in entries]


def _jpeg(seed, size=(40, 32)):
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def key_of(sample):
    return sample["__key__"]


def key_and_seed(sample):
    return sample["__key__"], sample["__seed__"]


def keys(batches):
    return [k for b in batches for k in b]


@pytest.fixture
def shards(tmp_path):
    return make_shards(tmp_path / "shards")


def pattern(folder):
    return os.path.join(folder, "shard-{000000..000004}.tar")


# ----------------------------------------------------------------------------- exactly once


@pytest.mark.parametrize("world_size,num_workers", [(1, 0), (1, 2), (2, 0), (3, 1), (2, 2)])
def test_epoch_is_exactly_once_with_equal_batch_counts(tmp_path, world_size, num_workers):
    make_shards(tmp_path)
    b = 2
    per_rank = []
    for rank in range(world_size):
        loader = build_stream(
            pattern(tmp_path),
            decode=key_of,
            batch_size=b,
            num_workers=num_workers,
            seed=3,
            rank=rank,
            world_size=world_size,
            shuffle_buffer=4,
        )
        batches = list(loader)
        assert len(batches) == len(loader) == 35 // (world_size * b)
        assert all(len(x) == b for x in batches)
        per_rank.append(keys(batches))
    seen = [k for r in per_rank for k in r]
    assert len(seen) == len(set(seen)), "a sample was read twice"
    # Documented drop: the last incomplete global batch, fewer than world_size * batch_size samples.
    assert 35 - len(seen) < world_size * b
    assert len(seen) == (35 // (world_size * b)) * world_size * b


def test_drop_last_false_sees_everything_and_counts_repeats(tmp_path):
    make_shards(tmp_path)
    seen, repeated = [], 0
    for rank in range(2):
        loader = build_stream(
            tmp_path,
            decode=key_of,
            batch_size=4,
            num_workers=0,
            seed=0,
            rank=rank,
            world_size=2,
            drop_last=False,
        )
        seen += keys(loader)
        repeated += loader.stats["repeated"]
    assert len(loader) == 5  # ceil(35 / 8)
    assert set(seen) == {f"s{i}_{j:03d}" for i, n in enumerate(SIZES) for j in range(n)}
    assert len(seen) == 40 and repeated == 5


def test_order_is_deterministic_per_seed_and_epoch(shards, tmp_path):
    def run(seed, epoch, workers=1):
        loader = build_stream(
            pattern(tmp_path / "shards"),
            decode=key_of,
            batch_size=5,
            num_workers=workers,
            seed=seed,
            rank=0,
            world_size=1,
            shuffle_buffer=8,
        )
        loader.set_epoch(epoch)
        return keys(loader)

    a = run(seed=1, epoch=0)
    assert a == run(seed=1, epoch=0)
    assert a != run(seed=1, epoch=1)
    assert a != run(seed=2, epoch=0)
    assert sorted(a) == sorted(run(seed=1, epoch=1))  # an epoch is a permutation of the same samples


def test_epochs_advance_by_themselves(shards, tmp_path):
    loader = build_stream(
        tmp_path / "shards", decode=key_of, batch_size=5, num_workers=0, seed=0, rank=0, world_size=1
    )
    first, second = keys(loader), keys(loader)
    assert loader.epoch == 2 and sorted(first) == sorted(second) and first != second
    loader.set_epoch(2)  # the current epoch: a no-op
    assert loader.state_dict()["epoch"] == 2
    it = loader.forever()
    across = [next(it) for _ in range(10)]  # 7 batches per epoch: crosses into epoch 3
    assert loader.epoch == 3 and len(keys(across)) == 50


# ----------------------------------------------------------------------------- resume


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_continues_with_the_same_batches(tmp_path, num_workers):
    make_shards(tmp_path, sizes=[13, 4, 17, 9, 6])

    def new():
        return build_stream(
            tmp_path,
            decode=key_of,
            batch_size=2,
            num_workers=num_workers,
            seed=5,
            rank=0,
            world_size=1,
            shuffle_buffer=5,
        )

    reference = new()
    full = list(reference) + list(reference)  # two epochs
    assert len(full) == 2 * 24

    first = new()
    it = iter(first)
    taken = [next(it) for _ in range(7)]
    state = first.state_dict()
    del it
    assert taken == full[:7]
    assert state["epoch"] == 0 and state["batches_in_epoch"] == 7

    resumed = new()
    resumed.load_state_dict(json.loads(json.dumps(state)))  # the state survives JSON
    rest = list(resumed) + list(resumed)
    assert rest == full[7:]


def test_resume_rejects_other_settings(shards, tmp_path):
    a = build_stream(
        tmp_path / "shards", decode=key_of, batch_size=2, num_workers=0, seed=0, rank=0, world_size=1
    )
    b = build_stream(
        tmp_path / "shards", decode=key_of, batch_size=3, num_workers=0, seed=0, rank=0, world_size=1
    )
    with pytest.raises(UserError, match="batch_size"):
        b.load_state_dict(a.state_dict())


def test_resume_skips_consumed_samples_without_decoding(shards, tmp_path):
    calls = Counter()

    def decode(sample):
        calls[sample["__key__"]] += 1
        return sample["__key__"]

    a = build_stream(
        tmp_path / "shards",
        decode=decode,
        batch_size=2,
        num_workers=0,
        seed=0,
        rank=0,
        world_size=1,
        shuffle_buffer=6,
    )
    it = iter(a)
    for _ in range(10):
        next(it)
    state = a.state_dict()
    calls.clear()
    b = build_stream(
        tmp_path / "shards",
        decode=decode,
        batch_size=2,
        num_workers=0,
        seed=0,
        rank=0,
        world_size=1,
        shuffle_buffer=6,
    )
    b.load_state_dict(state)
    rest = keys(b)
    assert sum(calls.values()) == len(rest) == 34 - 20  # nothing decoded twice, nothing decoded to skip


# ----------------------------------------------------------------------------- resampled


def test_resampled_mode_is_infinite_and_resumable(shards, tmp_path):
    def new():
        return build_stream(
            tmp_path / "shards",
            decode=key_of,
            batch_size=4,
            num_workers=0,
            seed=9,
            rank=0,
            world_size=1,
            mode="resampled",
            shuffle_buffer=6,
        )

    a = new()
    with pytest.raises(TypeError):
        len(a)
    it = iter(a)
    batches = [next(it) for _ in range(30)]  # 120 samples from 35: it keeps going
    assert len(keys(batches)) == 120
    b = new()
    it_b = iter(b)
    for _ in range(11):
        next(it_b)
    c = new()
    c.load_state_dict(b.state_dict())
    it_c = iter(c)
    assert [next(it_c) for _ in range(19)] == batches[11:]

    d = build_stream(
        tmp_path / "shards",
        decode=key_of,
        batch_size=4,
        num_workers=0,
        seed=9,
        rank=0,
        world_size=1,
        mode="resampled",
        batches_per_epoch=6,
    )
    assert len(d) == 6 and len(list(d)) == 6 and d.epoch == 1


# ----------------------------------------------------------------------------- bad data


@pytest.mark.parametrize("num_workers", [0, 2])
def test_corrupt_data_is_skipped_counted_and_never_hangs(tmp_path, caplog, num_workers):
    paths = make_shards(tmp_path, sizes=[6, 6, 6, 6], index=True, image=True)
    # Truncate shard 1 in the middle of its members.
    with open(paths[1], "rb") as f:
        data = f.read()
    with open(paths[1], "wb") as f:
        f.write(data[: len(data) // 2 + 100])
    # Replace one image in shard 2 with garbage.
    with wds.TarWriter(paths[2], encoder=False, mtime=0) as w:
        for j in range(6):
            jpg = b"not a jpeg at all" if j == 3 else _jpeg(j)
            w.write({"__key__": f"s2_{j:03d}", "txt": b"x", "jpg": jpg})

    def decode(sample):
        Image.open(io.BytesIO(sample["jpg"])).convert("RGB")
        return sample["__key__"]

    with caplog.at_level(logging.WARNING, logger="sapiens_train.stream"):
        loader = build_stream(
            tmp_path,
            decode=decode,
            batch_size=4,
            num_workers=num_workers,
            seed=0,
            rank=0,
            world_size=1,
            shuffle_buffer=5,
        )
        batches = list(loader)
    assert len(batches) == len(loader) == 6  # the rank still yields every batch it promised
    stats = loader.stats
    assert stats["skipped:UnidentifiedImageError"] == 1
    assert stats["skipped:missing"] >= 2
    assert stats["skipped"] == stats["skipped:UnidentifiedImageError"] + stats["skipped:missing"]
    assert stats["decoded"] == 24
    if num_workers == 0:  # (workers log from their own processes)
        assert "s2_003" in caplog.text and paths[1] in caplog.text
    assert "s2_003" not in keys(batches)
    assert loader.state_dict()["stats"]["skipped"] == stats["skipped"]


def test_a_broken_decode_raises_instead_of_skipping_everything(tmp_path):
    make_shards(tmp_path, sizes=[30, 30])

    def decode(sample):
        raise KeyError("jpg")

    loader = build_stream(tmp_path, decode=decode, batch_size=2, num_workers=0, seed=0, rank=0, world_size=1)
    with pytest.raises(RuntimeError, match="first 50 samples .* all failed to decode"):
        list(loader)


def test_no_decodable_sample_at_all_raises(tmp_path):
    make_shards(tmp_path, sizes=[3, 3])
    loader = build_stream(
        tmp_path, decode=lambda s: None, batch_size=2, num_workers=0, seed=0, rank=0, world_size=1
    )
    with pytest.raises(RuntimeError, match="no decodable sample"):
        list(loader)


def test_decode_returning_none_skips(shards, tmp_path):
    loader = build_stream(
        tmp_path / "shards",
        decode=lambda s: None if s["__key__"].startswith("s0") else 1,
        batch_size=4,
        num_workers=0,
        seed=0,
        rank=0,
        world_size=1,
        shard_shuffle=False,
    )
    assert len(list(loader)) == 8
    stats = loader.stats
    assert stats["decoded"] == 32 and stats["repeated"] == 7  # 7 padded in from the next samples
    assert stats["skipped"] == stats["skipped:decode returned None"] == 14  # s0 twice: 7 + 7 on the wrap


# ----------------------------------------------------------------------------- URLs and errors


def test_pipe_urls_and_index(shards, tmp_path):
    urls = [f"pipe:cat {p}" for p in shards]
    loader = build_stream(urls, decode=key_of, batch_size=5, num_workers=0, seed=0, rank=0, world_size=1)
    assert loader.num_samples == 35  # counted by streaming: no index next to pipe: URLs
    assert sorted(keys(loader)) == sorted(
        k
        for b in build_stream(
            str(tmp_path / "shards" / "index.json"),
            decode=key_of,
            batch_size=5,
            num_workers=0,
            seed=0,
            rank=0,
            world_size=1,
        )
        for k in b
    )


def test_http_urls(shards, tmp_path):
    handler = functools.partial(_QuietHandler, directory=str(tmp_path / "shards"))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        loader = build_stream(
            f"{base}/index.json",
            decode=key_of,
            batch_size=5,
            num_workers=2,
            seed=0,
            rank=0,
            world_size=1,
        )
        assert [s.url for s in loader.shards][0] == f"{base}/shard-000000.tar"
        got = keys(loader)
        direct = build_stream(
            base + "/shard-{000000..000004}.tar",
            decode=key_of,
            batch_size=5,
            num_workers=0,
            seed=0,
            rank=0,
            world_size=1,
        )
        assert direct.num_samples == 35
        assert sorted(got) == sorted(keys(direct)) and len(got) == 35
    finally:
        server.shutdown()
        server.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def test_counts_without_index(tmp_path):
    make_shards(tmp_path, index=False)
    shards = resolve_shards(pattern(tmp_path))
    assert [s.num_samples for s in shards] == SIZES


def test_clear_errors_before_any_work(tmp_path):
    with pytest.raises(UserError, match=r"nothing-\{0\.\.3\}"):
        build_stream(str(tmp_path / "nothing-{0..3}.tar"), decode=key_of, batch_size=1, num_workers=0, seed=0)
    with pytest.raises(UserError, match="no shards"):
        build_stream([], decode=key_of, batch_size=1, num_workers=0, seed=0)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="empty"):
        build_stream(tmp_path / "empty", decode=key_of, batch_size=1, num_workers=0, seed=0)
    with pytest.raises(UserError, match="index.json"):
        build_stream(str(tmp_path / "index.json"), decode=key_of, batch_size=1, num_workers=0, seed=0)
    make_shards(tmp_path / "small", sizes=[2, 1])
    with pytest.raises(UserError, match="fewer than one global batch"):
        build_stream(tmp_path / "small", decode=key_of, batch_size=4, num_workers=0, seed=0)


# ----------------------------------------------------------------------------- two ranks, gloo


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank, world_size, port, folder, out):
    # torch.multiprocessing.spawn leaves "spawn" as the default start method in the ranks; DataLoader
    # workers forked as under torchrun / deepspeed start in milliseconds instead of re-importing torch.
    multiprocessing.set_start_method("fork", force=True)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        loader = build_stream(
            folder, decode=key_of, batch_size=2, num_workers=2, seed=11, shuffle_buffer=4
        )  # rank and world size from torch.distributed
        batches = []
        for batch in loader:
            batches.append(list(batch))
            # A collective per step, as in training: unequal batch counts would hang here.
            t = torch.ones(1)
            torch.distributed.all_reduce(t)
        with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
            json.dump(
                {"batches": batches, "len": len(loader), "rank": loader.rank, "world": loader.world_size}, f
            )
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_two_workers_exactly_once(tmp_path):
    make_shards(tmp_path / "shards")
    out = tmp_path / "out"
    out.mkdir()
    torch.multiprocessing.spawn(
        _rank_main, args=(2, _free_port(), str(tmp_path / "shards"), str(out)), nprocs=2, join=True
    )
    results = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["rank"] for r in results] == [0, 1] and all(r["world"] == 2 for r in results)
    counts = [len(r["batches"]) for r in results]
    assert counts[0] == counts[1] == results[0]["len"] == 35 // 4
    seen = [k for r in results for b in r["batches"] for k in b]
    assert len(seen) == len(set(seen)) == 32  # 35 - 3: the last incomplete global batch is dropped


# ----------------------------------------------------------------------------- another number of ranks


@pytest.mark.parametrize(
    "world,taken,new_world,new_workers",
    [(2, 3, 1, 0), (1, 5, 2, 2), (3, 2, 2, 1), (2, 0, 3, 2), (2, 8, 1, 1)],
)
def test_elastic_state_continues_the_epoch_exactly_once(tmp_path, world, taken, new_world, new_workers):
    """States of every rank saved after `taken` batches, loaded on another world size (and number of
    workers): the rest of the epoch holds every sample no rank had read, once, but the last < one new
    global batch; the next epoch is a whole one again. Seeds follow the sample (the same augmentation)."""
    make_shards(tmp_path, sizes=[13, 4, 17, 9, 6])  # 49 samples

    def new(rank, w, workers=2):
        return build_stream(tmp_path, decode=key_and_seed, collate=list, batch_size=2, num_workers=workers,
                            seed=5, rank=rank, world_size=w, shuffle_buffer=5)  # fmt: skip

    seeds = {k: seed for r in range(world) for k, seed in keys(list(new(r, world)))}  # a whole epoch
    states, before = [], []
    for rank in range(world):
        loader = new(rank, world)
        it = iter(loader)
        before += keys([next(it) for _ in range(taken)])
        states.append(json.loads(json.dumps(loader.state_dict())))
        del it
    rest, next_epoch = [], []
    for rank in range(new_world):
        loader = new(rank, new_world, new_workers)
        loader.load_elastic_state(states)
        rest += keys(list(loader))
        assert loader.epoch == 1
        next_epoch += keys(list(loader))
    seen = [k for k, _ in before + rest]
    assert len(seen) == len(set(seen)), "a sample was read twice"
    assert 49 - len(seen) == (49 - len(before)) % (new_world * 2)
    assert all(seeds.get(k, seed) == seed for k, seed in before + rest)  # same seed as in the whole epoch
    assert len(next_epoch) == (49 // (new_world * 2)) * new_world * 2

    # A second hop within the same epoch: the saved rest rides along in the state.
    if rest and world == 2 and new_world == 1:
        hop = new(0, 1, 0)
        hop.load_elastic_state(states)
        it = iter(hop)
        first = keys([next(it) for _ in range(2)])
        state = json.loads(json.dumps(hop.state_dict()))
        del it
        again = []
        for rank in range(2):
            loader = new(rank, 2)
            loader.load_elastic_state([state])
            again += keys(list(loader))
        seen2 = [k for k, _ in before + first + again]
        assert len(seen2) == len(set(seen2))
        assert 49 - len(seen2) == (49 - len(before) - len(first)) % 4


def test_loader_workers_draw_nothing_from_the_global_rng(shards, tmp_path):
    """Starting DataLoader workers takes a base seed from the loader's own generator, so a resumed run
    (which starts them at another point of the global stream) keeps the global torch RNG in step."""
    loader = build_stream(tmp_path / "shards", decode=key_of, batch_size=2, num_workers=2, seed=0, rank=0,
                          world_size=1)  # fmt: skip
    torch.manual_seed(123)
    before = torch.get_rng_state()
    it = iter(loader)
    next(it)
    del it
    assert torch.equal(torch.get_rng_state(), before)
