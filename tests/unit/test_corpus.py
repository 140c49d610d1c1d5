"""The GPT example's parts: the standard-library byte corpus (data/corpus.py) and the model."""

from __future__ import annotations

import json

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
