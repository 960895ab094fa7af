"""Tests for the decode-once cache (data stage): preprocessing, stores, races, remote stores, batches."""

from __future__ import annotations

import io
import multiprocessing
import os
import uuid

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from raysearch.data import cache as cache_mod
from raysearch.data.cache import ImageCache, build_cache, cache_bytes, cache_key, open_cache
from raysearch.data.images import preprocess_image
from raysearch.data.loader import BatchLoader
from raysearch.errors import ConfigError, DataError
from raysearch.storage import exists, get_fs, join

S = 16


def _png(path, array: np.ndarray, mode: str | None = None) -> str:
    img = Image.fromarray(array) if mode is None else Image.fromarray(array).convert(mode)
    img.save(path, format="PNG")
    return str(path)


@pytest.fixture
def images(tmp_path) -> list[str]:
    """Varied little PNGs: sizes, grayscale, RGB, RGBA, LA, palette and 16-bit."""
    rng = np.random.default_rng(0)
    d = tmp_path / "imgs"
    d.mkdir()
    out = []
    for i, (h, w) in enumerate([(20, 30), (33, 12), (16, 16), (8, 40), (50, 45)]):
        out.append(_png(d / f"gray{i}.png", rng.integers(0, 256, (h, w), dtype=np.uint8)))
    out.append(_png(d / "rgb.png", rng.integers(0, 256, (24, 18, 3), dtype=np.uint8)))
    out.append(_png(d / "rgba.png", rng.integers(0, 256, (18, 24, 4), dtype=np.uint8)))
    out.append(_png(d / "la.png", rng.integers(0, 256, (21, 21), dtype=np.uint8), mode="LA"))
    out.append(_png(d / "p.png", rng.integers(0, 256, (19, 27, 3), dtype=np.uint8), mode="P"))
    out.append(_png(d / "u16.png", rng.integers(0, 4096, (30, 22), dtype=np.uint16)))
    return out


def _manifest(paths) -> pd.DataFrame:
    return pd.DataFrame({"image_path": paths, "label": np.arange(len(paths)) % 2})


# ----------------------------------------------------------------------------- preprocessing


def test_letterbox_geometry_on_a_wide_image():
    wide = np.full((10, 40), 255, np.uint8)  # 4:1 white bar
    buf = io.BytesIO()
    Image.fromarray(wide).save(buf, format="PNG")

    exact = preprocess_image(buf.getvalue(), image_size=40)  # side == size: no resize
    assert exact.shape == (40, 40) and exact.dtype == np.uint8
    assert (exact[15:25] == 255).all()
    assert (exact[:15] == 0).all() and (exact[25:] == 0).all()

    small = preprocess_image(buf.getvalue(), image_size=20)
    assert small.shape == (20, 20)
    assert (small[:6] == 0).all() and (small[14:] == 0).all()  # black bars top and bottom
    assert (small[8:12] == 255).all()  # the bar, centred, full width
    np.testing.assert_array_equal(small, small[::-1])  # centred: symmetric top/bottom


def test_tall_image_is_padded_left_and_right(tmp_path):
    tall = np.full((40, 10), 200, np.uint8)
    out = preprocess_image(_png(tmp_path / "tall.png", tall), image_size=40)
    assert (out[:, 15:25] == 200).all()
    assert (out[:, :15] == 0).all() and (out[:, 25:] == 0).all()


def test_rgb_becomes_luma_and_16bit_is_stretched(tmp_path):
    red = np.zeros((8, 8, 3), np.uint8)
    red[..., 0] = 255
    assert (preprocess_image(_png(tmp_path / "red.png", red), image_size=8) == 76).all()

    ramp = np.tile(np.linspace(100, 1100, 8).astype(np.uint16), (8, 1))  # 12-bit-ish data
    path = _png(tmp_path / "ramp16.png", ramp)
    assert Image.open(path).mode.startswith("I")
    out = preprocess_image(path, image_size=8)
    assert out[0, 0] == 0 and out[0, -1] == 255  # min..max -> 0..255, not clipped or dark
    assert (np.diff(out[0].astype(int)) > 0).all()


def test_preprocess_errors_name_the_image(tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png at all")
    with pytest.raises(DataError, match="bad.png"):
        preprocess_image(str(bad), image_size=S)
    with pytest.raises(DataError, match="missing.png"):
        preprocess_image(str(tmp_path / "missing.png"), image_size=S)


def test_cache_key_depends_on_order_and_size():
    a = cache_key(["x", "y"], image_size=S)
    assert a == cache_key(["x", "y"], image_size=S)
    assert a != cache_key(["y", "x"], image_size=S)
    assert a != cache_key(["x", "y"], image_size=S + 1)
    assert a != cache_key(["xy"], image_size=S)


# ----------------------------------------------------------------------------- building and opening


@pytest.mark.parametrize("num_workers", [1, 2])
def test_cache_equals_direct_decode(images, tmp_path, num_workers):
    cache = build_cache(
        _manifest(images),
        image_size=S,
        cache_dir=str(tmp_path / "c"),
        num_workers=num_workers,
        progress=False,
    )
    assert len(cache) == len(images) and cache.images.shape == (len(images), S, S)
    assert not cache.images.flags.writeable
    assert cache.index["image_path"].tolist() == images
    for row, path in enumerate(images):
        np.testing.assert_array_equal(cache.images[row], preprocess_image(path, image_size=S))
    np.testing.assert_array_equal(cache.rows_for(images[::-1]), np.arange(len(images))[::-1])
    assert sorted(os.listdir(tmp_path / "c")) == [cache.key]  # no temporary leftovers
    assert sorted(os.listdir(cache.path)) == ["images.u8", "index.parquet", "meta.json"]
    assert f"n={len(images)}" in repr(cache)
    # cache_bytes predicts the store's size, for the driver's free-space check.
    assert os.path.getsize(os.path.join(cache.path, "images.u8")) == cache_bytes(len(images), S)


def test_cache_bytes_is_n_times_s_squared():
    assert cache_bytes(40_005, 320) == 40_005 * 320 * 320 == 4_096_512_000
    assert cache_bytes(0, 64) == 0
    with pytest.raises(ConfigError, match="n_images must be >= 0, got -1"):
        cache_bytes(-1, 64)
    with pytest.raises(ConfigError, match="image_size must be >= 1, got 0"):
        cache_bytes(10, 0)


def test_second_call_reuses_the_store_without_decoding(images, tmp_path, monkeypatch):
    first = build_cache(_manifest(images), image_size=S, cache_dir=str(tmp_path), progress=False)

    def boom(*a, **k):
        raise AssertionError("decoded again")

    monkeypatch.setattr(cache_mod, "preprocess_image", boom)
    again = build_cache(_manifest(images), image_size=S, cache_dir=str(tmp_path), progress=False)
    assert again.path == first.path
    np.testing.assert_array_equal(again.images, first.images)
    np.testing.assert_array_equal(open_cache(str(tmp_path), first.key).images, first.images)


def test_rows_for_names_unknown_paths(images, tmp_path):
    cache = build_cache(_manifest(images), image_size=S, cache_dir=str(tmp_path), progress=False)
    with pytest.raises(DataError, match="nowhere.png"):
        cache.rows_for([images[0], "/data/nowhere.png"])


def _build_in_child(paths, cache_dir, barrier, results):
    barrier.wait()
    c = build_cache(_manifest(paths), image_size=S, cache_dir=cache_dir, progress=False)
    results.put((c.path, np.asarray(c.images).tobytes()))


def test_concurrent_builds_give_one_store(images, tmp_path):
    ctx = multiprocessing.get_context("forkserver")
    barrier, results = ctx.Barrier(2), ctx.Queue()
    cache_dir = str(tmp_path / "shared")
    procs = [
        ctx.Process(target=_build_in_child, args=(images, cache_dir, barrier, results))
        for _ in range(2)
    ]
    for p in procs:
        p.start()
    got = [results.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert got[0] == got[1]
    assert os.listdir(cache_dir) == [cache_key(images, image_size=S)]


def test_losing_the_rename_race_keeps_the_winner(images, tmp_path):
    cache_dir = tmp_path / "c"
    winner = build_cache(_manifest(images), image_size=S, cache_dir=str(cache_dir), progress=False)
    before = os.stat(os.path.join(winner.path, "meta.json")).st_mtime_ns
    # A second builder that started before the winner finished: it decodes, then loses the rename.
    cache_mod._build_local(
        parent=str(cache_dir),
        paths=images,
        key=winner.key,
        image_size=S,
        num_workers=1,
        skip_bad=False,
        progress=False,
    )
    assert os.listdir(cache_dir) == [winner.key]
    assert os.stat(os.path.join(winner.path, "meta.json")).st_mtime_ns == before


def test_memory_url_cache_dir(images, tmp_path, monkeypatch):
    monkeypatch.setenv("RAYSEARCH_LOCAL_CACHE", str(tmp_path / "node"))
    bucket = f"memory://raysearch-test-{uuid.uuid4().hex[:8]}"
    url = f"{bucket}/cache"
    try:
        built = build_cache(_manifest(images), image_size=S, cache_dir=url, progress=False)
        assert built.source == join(url, built.key)
        assert built.path == str(tmp_path / "node" / built.key)
        for name in ("images.u8", "index.parquet", "meta.json"):
            assert exists(join(url, built.key, name))

        # Another node: no local copy, so it downloads instead of decoding.
        monkeypatch.setenv("RAYSEARCH_LOCAL_CACHE", str(tmp_path / "node2"))
        monkeypatch.setattr(cache_mod, "preprocess_image", lambda *a, **k: 1 / 0)
        other = build_cache(_manifest(images), image_size=S, cache_dir=url, progress=False)
        assert other.path == str(tmp_path / "node2" / built.key)
        np.testing.assert_array_equal(other.images, built.images)
        assert other.rows_for(images[:2]).tolist() == [0, 1]
        np.testing.assert_array_equal(open_cache(url, built.key).images, built.images)
        with pytest.raises(DataError, match="no complete cache store"):
            open_cache(url, "0" * 20)
    finally:
        fs, p = get_fs(bucket)
        fs.rm(p, recursive=True)


def test_corrupt_image_fails_loudly_or_is_left_out_with_skip_bad(images, tmp_path):
    bad = tmp_path / "imgs" / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    paths = images[:3] + [str(bad)] + images[3:]
    with pytest.raises(DataError, match=r"1 images fail to decode: .*broken\.png"):
        build_cache(_manifest(paths), image_size=S, cache_dir=str(tmp_path / "c"), progress=False)
    assert not os.path.exists(tmp_path / "c") or os.listdir(tmp_path / "c") == []

    cache = build_cache(
        _manifest(paths),
        image_size=S,
        cache_dir=str(tmp_path / "c"),
        skip_bad=True,
        progress=False,
    )
    assert len(cache) == len(images) and cache.skipped == [str(bad)]
    for path in images:  # rows after the bad one moved down intact
        np.testing.assert_array_equal(
            cache.images[cache.rows_for([path])[0]], preprocess_image(path, image_size=S)
        )
    with pytest.raises(DataError, match="left out as undecodable"):
        cache.rows_for([str(bad)])
    with pytest.raises(DataError, match="broken.png"):  # never silently reused without skip_bad
        build_cache(_manifest(paths), image_size=S, cache_dir=str(tmp_path / "c"), progress=False)


def test_manifest_problems_are_data_errors(images, tmp_path):
    with pytest.raises(DataError, match="image_path"):
        build_cache(pd.DataFrame({"path": images}), image_size=S, cache_dir=str(tmp_path))
    with pytest.raises(DataError, match="more than once"):
        build_cache(_manifest(images + images[:1]), image_size=S, cache_dir=str(tmp_path))
    with pytest.raises(DataError, match="empty"):
        build_cache(_manifest([]), image_size=S, cache_dir=str(tmp_path))


def test_incomplete_store_is_reported(images, tmp_path):
    cache = build_cache(_manifest(images), image_size=S, cache_dir=str(tmp_path), progress=False)
    os.remove(os.path.join(cache.path, "meta.json"))
    with pytest.raises(DataError, match="not a complete cache store"):
        ImageCache(cache.path)


# ----------------------------------------------------------------------------- batches


@pytest.fixture
def store(tmp_path) -> ImageCache:
    """23 images whose pixels all equal their row number, so batches can be checked by value."""
    d = tmp_path / "rows"
    d.mkdir()
    paths = [_png(d / f"{i:02d}.png", np.full((4, 4), i, np.uint8)) for i in range(23)]
    return build_cache(
        _manifest(paths), image_size=4, cache_dir=str(tmp_path / "c"), progress=False
    )


def _epoch(loader: BatchLoader, epoch: int) -> list[int]:
    loader.set_epoch(epoch)
    return [r for _, _, rows in loader for r in rows.tolist()]


def test_batches_have_the_right_content_dtype_and_shape(store):
    rows = np.arange(23)[::-1].copy()
    labels = (rows % 2).astype(np.float32)
    loader = BatchLoader(store, rows, labels, batch_size=5, shuffle=True, seed=3)
    batches = list(loader)
    assert len(batches) == len(loader) == 5
    for images, y, r in batches:
        assert images.dtype == torch.uint8 and images.shape[1:] == (1, 4, 4)
        assert y.dtype == torch.float32 and r.dtype == torch.int64
        assert (images[:, 0, 0, 0].long() == r).all()  # pixel value == row: reordered correctly
        np.testing.assert_array_equal(y.numpy(), (r.numpy() % 2).astype(np.float32))
    assert sorted(r for _, _, rr in batches for r in rr.tolist()) == list(range(23))


def test_order_is_a_function_of_seed_and_epoch(store):
    rows, labels = np.arange(23), np.zeros(23, np.float32)
    a = BatchLoader(store, rows, labels, batch_size=4, shuffle=True, seed=1)
    b = BatchLoader(store, rows, labels, batch_size=4, shuffle=True, seed=1, prefetch=0)
    assert _epoch(a, 2) == _epoch(b, 2)
    assert _epoch(a, 2) != _epoch(a, 3)
    assert _epoch(a, 2) != _epoch(
        BatchLoader(store, rows, labels, batch_size=4, shuffle=True, seed=2), 2
    )
    assert _epoch(BatchLoader(store, rows, labels, batch_size=4, shuffle=False), 0) == list(
        range(23)
    )


@pytest.mark.parametrize("drop_last", [False, True])
def test_rank_shards_are_disjoint_equal_and_cover_everything(store, drop_last):
    rows, labels = np.arange(23), np.zeros(23, np.float32)
    world = 3
    loaders = [
        BatchLoader(
            store,
            rows,
            labels,
            batch_size=3,
            shuffle=True,
            seed=7,
            rank=r,
            world_size=world,
            drop_last=drop_last,
        )
        for r in range(world)
    ]
    shards = [_epoch(loader, 4) for loader in loaders]
    assert len({len(loader) for loader in loaders}) == 1  # every rank runs the same steps
    assert len({len(s) for s in shards}) == 1
    if not drop_last:
        assert [len(s) for s in shards] == [8, 8, 8]  # 23 padded to 24 by wrapping
        assert set().union(*map(set, shards)) == set(range(23))
        assert sum(len(s) for s in shards) - len(set().union(*map(set, shards))) == 1
    else:
        assert [len(s) for s in shards] == [6, 6, 6]
    # Disjoint except for the one row repeated to pad 23 up to 24.
    overlap = sum(len(set(shards[i]) & set(shards[j])) for i in range(world) for j in range(i))
    assert overlap <= 1


def test_breaking_out_early_stops_the_prefetch_thread(store):
    import threading

    loader = BatchLoader(
        store, np.arange(23), np.zeros(23, np.float32), batch_size=2, shuffle=False, prefetch=1
    )
    it = iter(loader)
    next(it)
    it.close()
    assert not any(t.name == "raysearch-prefetch" for t in threading.enumerate())


def test_batch_loader_rejects_bad_arguments(store):
    from raysearch.errors import ConfigError

    with pytest.raises(DataError, match="rows must lie"):
        BatchLoader(store, np.array([0, 99]), np.zeros(2), batch_size=2, shuffle=False)
    with pytest.raises(DataError, match="differ in length"):
        BatchLoader(store, np.arange(3), np.zeros(2), batch_size=2, shuffle=False)
    with pytest.raises(ConfigError, match="rank"):
        BatchLoader(
            store, np.arange(3), np.zeros(3), batch_size=2, shuffle=False, rank=2, world_size=2
        )


# ----------------------------------------------------------------------------- benchmark


def test_bench_data_smoke(tiny_root):
    from rich.console import Console

    from raysearch.bench.pipeline import bench_data

    out = io.StringIO()
    result = bench_data(
        root=tiny_root,
        image_size=S,
        n_images=12,
        batch_size=5,
        console=Console(file=out, width=100, color_system=None),
    )
    assert result["n_images"] == 12 and result["image_size"] == S
    for name in ("naive_images_per_s", "cached_images_per_s", "build_images_per_s", "speedup"):
        assert result[name] > 0
    # The median of the per-round ratios (paired rounds), inside their range.
    assert result["speedup_low"] <= result["speedup"] <= result["speedup_high"]
    text = out.getvalue()
    assert "naive" in text and "BatchLoader" in text and "images/s" in text
