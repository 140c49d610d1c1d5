"""The GPT example's parts: the standard-library byte corpus (data/corpus.py) and the model."""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from data import corpus
from data.corpus import StdlibBytes, in_validation, stdlib_files
from models.gpt import GPT


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus")
    StdlibBytes(str(path), block_size=64)  # builds it
    return path


def test_the_corpus_is_the_stdlib_without_tests_sorted_and_split_by_file(cache):
    root, files = stdlib_files()
    relative = [p.relative_to(root).as_posix() for p in files]
    assert relative == sorted(relative) and len(relative) > 100
    assert not [r for r in relative if "/test/" in f"/{r}" or "site-packages" in r]
    val = [r for r in relative if in_validation(r)]
    assert 0.02 < len(val) / len(relative) < 0.1
    meta = json.loads((cache / "meta.json").read_text())
    sizes = {p.relative_to(root).as_posix(): p.stat().st_size for p in files}
    assert meta["val"]["bytes"] == sum(sizes[r] for r in val)
    assert meta["train"]["bytes"] == sum(sizes.values()) - meta["val"]["bytes"]


def test_windows_are_fixed_and_shifted_by_one_byte(cache):
    data = StdlibBytes(str(cache), block_size=64, split="val")
    assert len(data) == (len(data.data) - 1) // 64
    x, y = data[3]
    raw = torch.from_numpy(data.data[192 : 192 + 65].astype("int64"))
    assert torch.equal(x, raw[:-1]) and torch.equal(y, raw[1:]) and x.dtype == torch.int64


def test_the_cache_is_read_not_rebuilt_and_a_damaged_one_is_rebuilt(cache, monkeypatch):
    calls = []
    real = corpus._build
    monkeypatch.setattr(corpus, "_build", lambda c: (calls.append(c), real(c)))
    digest = StdlibBytes(str(cache), split="train").digest
    assert calls == []  # read from the cache
    blob = cache / "train.bin"
    data = bytearray(blob.read_bytes())
    data[1000] ^= 0x20
    blob.write_bytes(bytes(data))
    assert StdlibBytes(str(cache), split="train").digest == digest  # rebuilt, the same bytes
    assert calls == [cache]


def test_the_identity_is_the_digest_of_the_split(cache):
    train, val = StdlibBytes(str(cache)), StdlibBytes(str(cache), split="val")
    meta = json.loads((cache / "meta.json").read_text())
    assert train.identity == f"sha256:{meta['train']['sha256']}"
    assert val.identity == f"sha256:{meta['val']['sha256']}" != train.identity


@pytest.fixture(scope="module")
def few_files():
    root, files = stdlib_files()
    val = [p for p in files if in_validation(p.relative_to(root).as_posix())]
    return root, sorted({*files[:27], *val[:3]}, key=files.index)


@pytest.fixture
def small(tmp_path, monkeypatch, few_files):
    """A cache of 30 files only (3 of them validation's): the damage tests rebuild it again and
    again."""
    monkeypatch.setattr(corpus, "stdlib_files", lambda: few_files)
    return tmp_path / "cache"


def _meta(cache, change):
    meta = json.loads((cache / "meta.json").read_text())
    change(meta)
    (cache / "meta.json").write_text(json.dumps(meta))


def _truncate(path, keep=0.5):
    path.write_bytes(path.read_bytes()[: int(path.stat().st_size * keep)])


def _flip(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x20
    path.write_bytes(bytes(data))


DAMAGE = {
    "torn meta.json": lambda c: _truncate(c / "meta.json"),
    "empty meta.json": lambda c: (c / "meta.json").write_bytes(b""),
    "garbage meta.json": lambda c: (c / "meta.json").write_bytes(b"\xff\x00" * 40),
    "meta.json of another shape": lambda c: (c / "meta.json").write_text('["train"]'),
    "meta.json without the split": lambda c: _meta(c, lambda m: m.pop("train")),
    "meta.json without the digest": lambda c: _meta(c, lambda m: m["train"].pop("sha256")),
    "meta.json with a wrong size": lambda c: _meta(c, lambda m: m["train"].update(bytes="x")),
    "meta.json with a wrong digest": lambda c: _meta(
        c, lambda m: m["train"].update(sha256="0" * 64)
    ),
    "no meta.json": lambda c: (c / "meta.json").unlink(),
    "truncated train.bin": lambda c: _truncate(c / "train.bin"),
    "empty train.bin": lambda c: (c / "train.bin").write_bytes(b""),
    "no train.bin": lambda c: (c / "train.bin").unlink(),
    "altered train.bin": lambda c: _flip(c / "train.bin"),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_cache_of_any_kind_is_rebuilt(small, monkeypatch, damage):
    """Issue 21, item 13: a torn meta.json stopped every restart (an unguarded json.loads)."""
    digest = StdlibBytes(str(small)).digest
    DAMAGE[damage](small)
    calls = []
    real = corpus._build
    monkeypatch.setattr(corpus, "_build", lambda c: (calls.append(c), real(c)))
    assert StdlibBytes(str(small)).digest == digest  # rebuilt, the same bytes
    assert StdlibBytes(str(small), split="val").digest  # the other split too
    assert calls == [small]  # once: the rebuilt cache is read from then on


def test_the_cache_is_written_durably_meta_json_last(small, monkeypatch):
    """Every file fsynced before its rename, the directory after it; meta.json, which vouches
    for the split files, written after them."""
    synced = []
    real = os.fsync
    monkeypatch.setattr(
        os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")), real(fd))
    )
    StdlibBytes(str(small))
    names = [Path(p).name for p in synced]
    order = [n.split(".tmp")[0].rsplit(".", 1)[0].lstrip(".") for n in names if n.endswith(".tmp")]
    assert order == ["train.bin", "val.bin", "meta.json"], names
    assert names.count(small.name) >= 3  # the directory, after each rename
    assert not [p for p in small.iterdir() if p.name.startswith(".")]  # no temporary left


def test_ranks_building_at_the_same_time_all_read_the_same_bytes(small):
    with ThreadPoolExecutor(4) as pool:
        digests = list(pool.map(lambda _: StdlibBytes(str(small)).digest, range(4)))
    assert len(set(digests)) == 1
    assert sorted(p.name for p in small.iterdir()) == ["meta.json", "train.bin", "val.bin"]


def test_the_model_is_causal():
    torch.manual_seed(0)
    model = GPT(block_size=16, n_layer=2, n_head=2, n_embd=32).eval()
    a = torch.randint(256, (1, 16))
    b = a.clone()
    b[0, 10:] = (b[0, 10:] + 1) % 256  # change the future only
    with torch.no_grad():
        la, lb = model(a), model(b)
    assert la.shape == (1, 16, 256)
    assert torch.equal(la[0, :10], lb[0, :10]) and not torch.equal(la[0, 10:], lb[0, 10:])
    with pytest.raises(ValueError, match="longer than block_size"):
        model(torch.zeros(1, 17, dtype=torch.long))


def test_the_corpus_as_shards_stores_windows_of_bytes_and_reads_back_the_same_pairs(tmp_path):
    """`python -m spot data write -- data=stdlib` stores each window as its 129 bytes
    (`stored`); data=stdlib_shards' transform makes the same int64 pairs again, bitwise, from
    shards about 16 times smaller than the pairs would be."""
    from spot.shards.dataset import ShardedDataset
    from spot.shards.write import write

    full = StdlibBytes(str(tmp_path / "corpus"), block_size=128)

    class First(torch.utils.data.Dataset):  # the first 600 windows, stored as the corpus does
        def __len__(self):
            return 600

        def __getitem__(self, i):
            return full[i]

        def stored(self, i):
            return full.stored(i)

    index = write(First(), str(tmp_path / "shards"), 2**16, {})
    read = ShardedDataset(
        str(tmp_path / "shards"), cache_dir=str(tmp_path / "c"), transform=corpus.next_byte_pairs
    )
    for i in (0, 1, 299, 599):
        (x, y), (a, b) = read[i], full[i]
        assert x.dtype == a.dtype == torch.int64 and torch.equal(x, a) and torch.equal(y, b)
    stored = sum(s["bytes"] for s in index["shards"])
    assert stored < 600 * 2 * 128 * 8 / 12  # int64 pairs: 2 KiB a window
