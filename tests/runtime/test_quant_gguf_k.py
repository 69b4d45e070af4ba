"""Q4_K repacked into int4 group 32 and Q6_K kept at int8 group 32 under weights="int4"
(runtime/quant_gguf.py): against gguf.quants.dequantize within the stated bounds, on random
blocks, on real tensors of the Qwen GGUF and through a whole mixed GGUF file (int4 and
int8 QuantLinears in one net, on the CPU's reference path and, with CUDA, its kernels).

Bounds. Q4_K: ours is q * fp16(s) + fp16(m) with s = d * sc_j, m = -dmin * m_j (exact in
fp32), gguf's q * s + m, so |err| <= |q * ds| + |dm| + fp32 rounding, with |ds| <= eps(s),
|dm| <= eps(m), eps(x) = max(2^-11 |x|, 2^-25) (half an fp16 ulp; subnormal spacing 2^-24).
int8 requantized (Q6_K): q = round(w / s), s = fp16(absmax / 127): |err| <= s / 2 +
127 eps(s) (the second term: values clamped at +-127 when s rounded down; 0.062 s for a
normal s, up to 3.8e-6 for a subnormal one), times 1 + 2^-20 for the rounding of 1/s.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import write_llama_gguf

import kvloft
from kvloft.kernels.quant import dequantize, quantize_int8, reference_matmul
from kvloft.kernels.quant.ops import quant_matmul
from kvloft.runtime.loader import build
from kvloft.runtime.quant_gguf import linear_storage, packed_tensors, repack
from kvloft.runtime.quant_linear import QuantLinear, scheme, weights_scheme
from kvloft.scheduler.budget import plan_memory, weight_bytes

gguf = pytest.importorskip("gguf")

Q4K, Q6K = gguf.GGMLQuantizationType.Q4_K, gguf.GGMLQuantizationType.Q6_K


def eps16(x: np.ndarray) -> np.ndarray:
    """The largest |fp16(x) - x| for x [...] float64 in fp16's range (round to nearest)."""
    return np.maximum(np.abs(x) * 2.0**-11, 2.0**-25)


def q4_k_bound(raw: np.ndarray, n: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """raw Q4_K bytes -> (|err| bound [n, k], mask [n, k] of sub-blocks whose d, dmin are
    finite and whose s, m fit fp16), from gguf's own scale/min decoding."""
    b = raw.reshape(-1, 144)
    d = b[:, 0:2].copy().view(np.float16).astype(np.float64)
    dmin = b[:, 2:4].copy().view(np.float16).astype(np.float64)
    sc, mn = gguf.quants.Q4_K.get_scale_min(b[:, 4:16].copy())
    with np.errstate(invalid="ignore", over="ignore"):
        s, m = d * sc, -dmin * mn  # [n_sb, 8]
        ok = np.isfinite(s) & np.isfinite(m) & (np.abs(s) < 65504) & (np.abs(m) < 65504)
        s, m = np.where(ok, s, 0), np.where(ok, m, 0)
        bound = 15 * eps16(s) + eps16(m) + 2.0**-22 * (15 * np.abs(s) + np.abs(m))
    expand = lambda a: np.repeat(a.reshape(-1), 32).reshape(n, k)
    return expand(bound), expand(ok)


def random_q4_k(rng: np.random.Generator, n: int, k: int, realistic: bool) -> np.ndarray:
    """Random Q4_K bytes [n * k / 256 * 144]; realistic: d, dmin drawn as a model's (< 0.01)."""
    raw = rng.integers(0, 256, n * k // 256 * 144, dtype=np.uint8)
    if realistic:
        b = raw.reshape(-1, 144)
        for col in (0, 2):
            b[:, col:col + 2] = (rng.random(b.shape[0]) * 0.01).astype(np.float16).view(np.uint8).reshape(-1, 2)
    return raw


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # gguf's numpy on random bytes' inf/NaN scales
@pytest.mark.parametrize("realistic", [False, True])
@pytest.mark.parametrize("n,k", [(3, 256), (7, 768)])
def test_q4_k_repack_within_fp16_rounding(n, k, realistic):
    raw = random_q4_k(np.random.default_rng(n + k), n, k, realistic)
    want = gguf.quants.dequantize(raw, Q4K).reshape(n, k).astype(np.float64)
    pw = repack(torch.from_numpy(raw.copy()), "Q4_K", (n, k))
    pw.validate()
    assert pw.bits == 4 and pw.group == 32 and pw.mins is not None
    got = dequantize(pw).double().numpy()
    bound, ok = q4_k_bound(raw, n, k)
    assert ok.mean() > (0.99 if realistic else 0.3)
    err = np.abs(got - want)[ok]
    assert (err <= bound[ok]).all(), float((err / bound[ok]).max())
    assert np.isfinite(got[ok]).all()
    if realistic:  # and the GEMV kernel reads the layout (the Triton interpreter here)
        x = torch.randn(3, k)
        torch.testing.assert_close(quant_matmul(x, pw), reference_matmul(x, pw), rtol=1e-5, atol=1e-5)


def test_q4_k_nibble_layout_is_exact_with_exact_scales():
    """d = 1, dmin = 0 and sc = 1: s = 1 is exact in fp16, so every value is its nibble."""
    rng = np.random.default_rng(1)
    raw = random_q4_k(rng, 2, 512, realistic=False).reshape(-1, 144)
    raw[:, 0:2] = np.array([1.0], np.float16).view(np.uint8)
    raw[:, 2:4] = 0
    raw[:, 4:16] = 0  # every min 0
    raw[:, 4:8] = 1  # sc_0..3 = 1 (6 low bits of bytes 4..7)
    raw[:, 12:16] = 0x01  # sc_4..7 = 1 (low nibbles of bytes 12..15)
    raw = raw.reshape(-1)
    want = gguf.quants.dequantize(raw, Q4K).reshape(2, 512)
    got = dequantize(repack(torch.from_numpy(raw.copy()), "Q4_K", (2, 512)))
    assert torch.equal(got, torch.from_numpy(want))
    assert len(np.unique(want)) == 16  # every nibble value seen: the layout is checked


def int8_bound(pw) -> torch.Tensor:
    """The requantization bound [N, K] of an int8 group-32 weight (module doc)."""
    s = pw.scales.double().repeat_interleave(32, dim=1)[:, : pw.shape[1]]
    return (s / 2 + 127 * torch.clamp(s * 2.0**-11, min=2.0**-25)) * (1 + 2.0**-20)


def int8_requant_ok(w: torch.Tensor) -> None:
    """w [N, K] -> int8 group 32 within int8_bound; within s / 2 wherever s is a normal fp16."""
    pw = quantize_int8(w, 32)
    err = (dequantize(pw) - w).abs()
    assert err.le(int8_bound(pw)).all()
    s = pw.scales.float().repeat_interleave(32, dim=1)[:, : w.shape[1]]
    normal = s >= 2.0**-14
    assert normal.float().mean() > 0.5 and (err[normal] <= s[normal] * (0.5 + 127 * 2.0**-11)).all()


def test_q6_k_kept_at_int8_within_half_a_step():
    rng = np.random.default_rng(2)
    raw = rng.integers(0, 256, 5 * 2 * 210, dtype=np.uint8).reshape(-1, 210)
    raw[:, 208:210] = (rng.random(raw.shape[0]) * 1e-3).astype(np.float16).view(np.uint8).reshape(-1, 2)
    w = torch.from_numpy(gguf.quants.dequantize(raw.reshape(-1), Q6K).reshape(5, 512).copy())
    int8_requant_ok(w)


@pytest.mark.qwen
def test_real_q4_k_and_q6_k_tensors_of_qwen():
    from kvloft.runtime import catalog

    path = catalog.cache_dir() / "models" / catalog.CATALOG["qwen2.5-coder-0.5b-instruct"].file
    if not path.is_file():
        pytest.skip(f"{path} is absent: run `make models`")
    from kvloft.runtime.gguf_weights import GGUFFile

    seen = set()
    for t in GGUFFile(path).infos:
        q = t.qtype
        if q in ("Q4_K", "Q6_K") and q not in seen:
            seen.add(q)
            n, k = 128, int(t.shape[1])  # the first 128 rows of [N, K] (blocks never span rows)
            raw = np.fromfile(path, np.uint8, n * t.n_bytes // int(t.shape[0]), offset=t.offset)
            want = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[q]).reshape(n, k)
            if q == "Q6_K":
                int8_requant_ok(torch.from_numpy(want.copy()))
                continue
            got = dequantize(repack(torch.from_numpy(raw.copy()), q, (n, k))).double().numpy()
            bound, ok = q4_k_bound(raw, n, k)
            assert ok.all() and (np.abs(got - want) <= bound).all()
    assert seen == {"Q4_K", "Q6_K"}


# ---- a whole GGUF file mixing K-quants, Q5_0, Q8_0 and F16 -----------------------------------

H, F, NH, NKV, V = 256, 512, 4, 2, 64
TYPES = {"blk.0.attn_q.weight": "Q4_K", "blk.0.attn_k.weight": "Q6_K", "blk.0.attn_v.weight": "Q5_0",
         "blk.0.attn_output.weight": "Q8_0", "blk.0.ffn_gate.weight": "Q4_K", "blk.0.ffn_up.weight": "F16",
         "blk.0.ffn_down.weight": "Q6_K", "output.weight": "Q4_K"}
HELD = {"Q4_K": (4, 32), "Q6_K": (8, 32), "Q5_0": (8, 32), "Q8_0": (8, 32)}  # under "int4"; F16: the scheme
HF = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output", "gate_proj": "ffn_gate",
      "up_proj": "ffn_up", "down_proj": "ffn_down"}


def _raw_block_bytes(rng, qtype: str, shape: tuple[int, int]) -> np.ndarray:
    """Random K-quant bytes [N, K / 256 * size] with a model's scale sizes."""
    n, k = shape
    if qtype == "Q4_K":
        raw = random_q4_k(rng, n, k, realistic=True).reshape(-1, 144)
        raw[:, 0:4] = (rng.random((raw.shape[0], 2)) * 2e-4).astype(np.float16).view(np.uint8)
    else:
        raw = rng.integers(0, 256, n * k // 256 * 210, dtype=np.uint8).reshape(-1, 210)
        raw[:, 208:210] = (rng.random(raw.shape[0]) * 1e-4).astype(np.float16).view(np.uint8).reshape(-1, 2)
    return raw.reshape(n, -1)


@pytest.fixture(scope="module")
def k_gguf(tmp_path_factory):
    def tensor(name, shape, rng):
        q = TYPES.get(name, "F32")
        a = (rng.standard_normal(shape) * 0.05).astype(np.float32)
        if q in ("Q4_K", "Q6_K"):
            return _raw_block_bytes(rng, q, shape), gguf.GGMLQuantizationType[q]
        if q in ("Q5_0", "Q8_0"):
            t = gguf.GGMLQuantizationType[q]
            return gguf.quants.quantize(a, t), t
        return (a.astype(np.float16) if q == "F16" else a), None

    return write_llama_gguf(tmp_path_factory.mktemp("gguf") / "kquants.gguf", H, F, NH, NKV, V, tensor)


def _load(path, weights, group=128, device="cpu", dtype=torch.float32):
    from kvloft.runtime.loader import load_gguf

    return load_gguf(path, device=torch.device(device), dtype=dtype, tokenizer=object(), cache=False,
                     quant=scheme(weights, group))


def _gguf_type(module: str) -> str:
    if module == "lm_head":
        return TYPES["output.weight"]
    return TYPES[f"blk.0.{HF[module.rsplit('.', 1)[1]]}.weight"]


def _logits(model) -> torch.Tensor:
    s = kvloft.Session(model, kvloft.RetrievalConfig(method="dense"), kvloft.RuntimeConfig(progress=False))
    s.feed(list(range(1, 9)))
    return s.last_logits.float().cpu()


@pytest.mark.parametrize("group", [128, 64])
def test_int4_keeps_k_quants_and_widens_the_rest(k_gguf, group):
    """Loader stats, each layer's bits/group, its values against the fp32 dequantization,
    and a mixed int4+int8 net run through a Session closer to the reference than before."""
    from kvloft.runtime.gguf_weights import GGUFFile

    gg = GGUFFile(k_gguf)
    cfg = gg.config("k")
    how: dict[str, int] = {}
    for _ in packed_tensors(gg, cfg, scheme("int4", group), how):
        pass
    assert how == {"repacked": 5, "requantized_int8": 2, "requantized": 1, "dense": 4}
    ref, q = _load(k_gguf, "bf16"), _load(k_gguf, "int4", group)
    assert q.weights == "int4" == weights_scheme(q.net)
    for name, m in q.net.named_modules():
        if not isinstance(m, QuantLinear):
            continue
        qtype = _gguf_type(name)
        assert (m.bits, m.group) == HELD.get(qtype, (4, group)), name
        assert m.backend == "reference"
        want, got = ref.net.get_submodule(name).weight, dequantize(m.packed)
        if qtype in ("Q5_0", "Q8_0"):
            assert torch.equal(got, want), name
        elif qtype == "Q4_K":  # within the fp16 rounding of s and m (module doc), via the held scales
            s = m.packed.scales.float().repeat_interleave(32, 1)
            mn = m.packed.mins.float().repeat_interleave(32, 1)
            bound = 15 * torch.clamp(s.abs() * 2.0**-11, min=2.0**-25) + torch.clamp(mn.abs() * 2.0**-11, min=2.0**-25)
            assert ((got - want).abs() <= bound * (1 + 2.0**-8) + 2.0**-22 * want.abs()).all(), name
        elif qtype == "Q6_K":
            assert (got - want).abs().le(int8_bound(m.packed)).all(), name
    # the memory rule: the header's storage counts what the loaded net holds
    storage = linear_storage(gg, cfg, scheme("int4", group))
    assert weight_bytes(cfg, 4, "int4", group, storage=storage) == q.weight_bytes
    assert weight_bytes(cfg, 4, "int4", group) != q.weight_bytes  # the scheme's rule alone is not it
    rt = kvloft.RuntimeConfig(weights="int4", quant_group=group)
    plan = plan_memory(cfg, kvloft.RetrievalConfig(method="dense"), rt, 64, "float32", weight_storage=storage,
                       check=False)
    assert plan.weights == q.weight_bytes
    # the whole net: closer to the reference than the older rule (everything int4 group `group`)
    old = _load(k_gguf, "bf16")
    old.net = build(cfg, packed_tensors(gg, cfg, scheme("int4", group), keep_gguf=False), torch.device("cpu"),
                    torch.float32, "old", scheme("int4", group))
    want = _logits(ref)
    err = lambda a: ((a - want).norm() / want.norm()).item()
    new_err, old_err = err(_logits(q)), err(_logits(old))
    assert new_err < 0.05 and new_err < old_err


@pytest.mark.gpu
def test_mixed_net_on_cuda_picks_a_kernel_per_layer(k_gguf):
    """bf16 on CUDA: int4 layers run tinygemm, int8 ones the Triton GEMV; logits near the
    CPU's fp32 reference path of the same packed weights."""
    gpu, cpu = _load(k_gguf, "int4", device="cuda", dtype=torch.bfloat16), _load(k_gguf, "int4")
    for name, m in gpu.net.named_modules():
        if isinstance(m, QuantLinear):
            assert m.backend == ("tinygemm" if m.bits == 4 else "triton"), (name, m.tinygemm_off)
    a, b = _logits(gpu), _logits(cpu)
    assert ((a - b).norm() / b.norm()).item() < 0.03


def test_loader_logs_k_quants_as_repacked(k_gguf, caplog):
    """load_gguf(..., quant=int4) reports Q4_K among the repacked tensors; the older rule
    (keep_gguf=False) requantized every linear of this file."""
    from kvloft.runtime.gguf_weights import GGUFFile

    with caplog.at_level("INFO", logger="kvloft.runtime.loader"):
        _load(k_gguf, "int4")
    for part in ("'repacked': 5", "'requantized_int8': 2", "'requantized': 1", "'dense': 4"):
        assert part in caplog.text
    gg = GGUFFile(k_gguf)
    how: dict[str, int] = {}
    for _ in packed_tensors(gg, gg.config("k"), scheme("int4"), how, keep_gguf=False):
        pass
    assert how == {"requantized": 8, "dense": 4}
