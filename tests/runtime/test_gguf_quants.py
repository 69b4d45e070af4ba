"""GGUF dequantization in torch equals gguf.quants.dequantize exactly (fp32), on real tensors of
SmolLM2's GGUF and on random blocks of every type kvloft decodes itself."""

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from kvloft.runtime.gguf_header import read_header
from kvloft.runtime.gguf_quants import BLOCK_DEQUANT, dequantize
from kvloft.runtime.gguf_weights import GGUFFile


def _reference(raw: np.ndarray, qtype: str) -> torch.Tensor:
    out = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[qtype])
    return torch.from_numpy(np.ascontiguousarray(out, dtype=np.float32)).reshape(-1)


def _equal(got: torch.Tensor, ref: torch.Tensor) -> None:
    torch.testing.assert_close(got, ref, rtol=0, atol=0, equal_nan=True)


# blocks decode independently: a tensor's first REAL_BLOCKS blocks hold its type's real scales and
# codes (gguf's reference dequantizes a Q4_K tensor of 4.4M values in seconds on a small CPU)
REAL_BLOCKS = 2048


def _real_blocks(t) -> tuple[np.ndarray, int]:
    """A GGUF tensor's first REAL_BLOCKS blocks (all of it if fewer): (raw bytes [n_bytes] uint8, values)."""
    block, type_size = gguf.GGML_QUANT_SIZES[t.tensor_type]
    n_blocks = min(int(t.n_elements) // block, REAL_BLOCKS)
    return np.asarray(t.data).view(np.uint8).reshape(-1)[: n_blocks * type_size], n_blocks * block


@pytest.fixture(scope="module")
def smollm2_reader(smollm2_gguf):
    return gguf.GGUFReader(str(smollm2_gguf))


def test_real_tensors_of_smollm2(smollm2_reader):
    """Two tensors of each type the file holds (Q4_1, Q8_0, F32), their first REAL_BLOCKS blocks:
    bit for bit."""
    seen: dict[str, int] = {}
    for t in smollm2_reader.tensors:
        q = t.tensor_type.name
        if seen.get(q, 0) >= 2:
            continue
        seen[q] = seen.get(q, 0) + 1
        raw, n = _real_blocks(t)
        got = dequantize(torch.from_numpy(raw.copy()), q, n)
        _equal(got, _reference(raw, q))
    assert {"Q4_1", "Q8_0", "F32"} <= set(seen)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy on the NaN/inf scales random bytes make
@pytest.mark.parametrize("qtype", sorted(BLOCK_DEQUANT) + ["F16", "BF16"])
def test_random_blocks(qtype):
    """Random bytes are valid blocks of every type (NaN/inf scales included): equal to gguf's."""
    block, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[qtype]]
    n_blocks = 1000
    raw = np.random.default_rng(0).integers(0, 256, n_blocks * type_size, dtype=np.uint8)
    got = dequantize(torch.from_numpy(raw.copy()), qtype, n_blocks * block)
    _equal(got, _reference(raw, qtype))


def test_header_parser_equals_gguf_reader(smollm2_reader, smollm2_gguf):
    path = smollm2_gguf
    fields, tensors = read_header(path)
    for key, field in smollm2_reader.fields.items():
        if not key.startswith("GGUF."):
            assert fields[key] == field.contents(), key
    assert len(tensors) == len(smollm2_reader.tensors)
    for ours, ref in zip(tensors, smollm2_reader.tensors):
        assert (ours.name, ours.offset, ours.n_bytes, ours.qtype) == (
            ref.name, ref.data_offset, ref.n_bytes, ref.tensor_type.name)
        assert list(ours.shape) == list(reversed(ref.shape.tolist()))


def test_stream_names_and_shapes(smollm2_reader, smollm2_gguf):
    """GGUFFile.tensors yields HF names and row-major shapes; the first tensors match gguf's values."""
    g = GGUFFile(smollm2_gguf)
    cfg = g.config("smollm2")
    stream = g.tensors(cfg)
    name, w = next(stream)
    assert name == "embed_tokens.weight" and list(w.shape) == [cfg.vocab_size, cfg.hidden_size]
    ref = smollm2_reader.tensors[0]
    _equal(w.reshape(-1), _reference(np.asarray(ref.data).view(np.uint8).reshape(-1), ref.tensor_type.name))
    stream.close()


@pytest.mark.qwen
def test_k_quants_of_qwen():
    """Q4_K, Q5_0, Q6_K and Q8_0 tensors of the Qwen GGUF (when present), their first REAL_BLOCKS
    blocks: bit for bit."""
    from kvloft.runtime import catalog

    entry = catalog.CATALOG["qwen2.5-coder-0.5b-instruct"]
    path = catalog.cache_dir() / "models" / entry.file
    if not path.is_file():
        pytest.skip(f"{path} is absent: run `make models`")
    want = {"Q4_K", "Q6_K", "Q5_0", "Q8_0"}
    for t in GGUFFile(path).infos:  # (gguf's reader parses Qwen's 151K-token vocabulary: ~8 s)
        q = t.qtype
        if q in want and t.n_elements < 10_000_000:
            want.discard(q)
            block, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[q]]
            n_blocks = min(t.n_elements // block, REAL_BLOCKS)
            raw = np.fromfile(path, np.uint8, n_blocks * type_size, offset=t.offset)
            _equal(dequantize(torch.from_numpy(raw.copy()), q, n_blocks * block), _reference(raw, q))
    assert not want, f"no small tensor of type {want}"
