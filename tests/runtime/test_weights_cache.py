"""The converted-weights cache (GGUF -> safetensors, once), the cache dir, safetensors streaming."""

import hashlib
import json

import pytest
import torch
from safetensors import safe_open

import kvloft
from kvloft.kernels import REFERENCE
from kvloft.runtime import catalog, safetensors_io, weights_cache
from kvloft.runtime.attention import DenseAttention


@pytest.fixture
def cache_root(tmp_path, monkeypatch):
    monkeypatch.setenv("KVLOFT_CACHE_DIR", str(tmp_path / "cache"))
    catalog.cache_dir.cache_clear()
    yield tmp_path / "cache"
    catalog.cache_dir.cache_clear()


def test_cache_dir_env(tmp_path, monkeypatch):
    monkeypatch.delenv("KVLOFT_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    catalog.cache_dir.cache_clear()
    try:
        assert catalog.cache_dir() == tmp_path / "xdg" / "kvloft"
        monkeypatch.setenv("KVLOFT_CACHE_DIR", str(tmp_path / "own"))
        assert catalog.cache_dir() == tmp_path / "xdg" / "kvloft"  # read once
        catalog.cache_dir.cache_clear()
        assert catalog.cache_dir() == tmp_path / "own"
    finally:
        catalog.cache_dir.cache_clear()


def _logits(model, text="The capital of France is"):
    ids = torch.tensor(model.tokenizer.encode(text))
    return model.net(ids, torch.arange(len(ids)), DenseAttention(model.config, REFERENCE, model.device, model.dtype))


def test_smollm2_converted_once_then_read_back(cache_root, monkeypatch):
    try:
        path = kvloft.runtime.catalog.find_smollm2_gguf()
    except ValueError as e:
        pytest.skip(str(e))
    first = kvloft.load_model("smollm2", device="cpu", dtype="bfloat16", cache=True)
    entries = sorted(p.name for p in (cache_root / "converted").iterdir())
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    assert entries == sorted(["index.json", f"{sha}-bfloat16-v1.json", f"{sha}-bfloat16-v1.safetensors"])
    index = json.loads((cache_root / "converted" / "index.json").read_text())
    assert index[str(path.resolve())]["sha256"] == sha

    class NoHashing:
        def sha256(self):
            raise AssertionError("the second load hashed the GGUF again")

    monkeypatch.setattr(weights_cache, "hashlib", NoHashing())
    second = kvloft.load_model("smollm2", device="cpu", dtype="bfloat16", cache=True)
    assert second.config == first.config
    for (n1, p1), (n2, p2) in zip(first.net.named_parameters(), second.net.named_parameters()):
        assert n1 == n2 and torch.equal(p1, p2), n1
    assert second.net.lm_head.weight is second.net.embed_tokens.weight
    assert second.tokenizer.encode("Hello 123 <|im_end|>") == first.tokenizer.encode("Hello 123 <|im_end|>")
    assert second.tokenizer.eos_ids == first.tokenizer.eos_ids
    assert torch.equal(_logits(first), _logits(second))


def test_safetensors_io_round_trip_with_the_library(tmp_path):
    tensors = {"a": torch.randn(3, 5), "b": torch.randn(7).to(torch.bfloat16), "c": torch.randn(2, 2).half()}
    path = tmp_path / "x.safetensors"
    safetensors_io.write(path, tensors.items())
    with safe_open(str(path), framework="pt") as f:  # the library reads our file
        assert sorted(f.keys()) == ["a", "b", "c"]
        for k, t in tensors.items():
            assert torch.equal(f.get_tensor(k), t)
    from safetensors.torch import save_file

    save_file(tensors, str(tmp_path / "y.safetensors"))  # and we read the library's
    got = dict(safetensors_io.read(tmp_path / "y.safetensors"))
    assert got.keys() == tensors.keys() and all(torch.equal(got[k], tensors[k]) for k in tensors)
