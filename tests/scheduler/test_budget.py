"""The GPU memory plan: component sizes against the code's own objects, and refusals."""

import dataclasses

import pytest
import torch

from kvloft import CacheConfig, ModelConfig, RetrievalConfig, RuntimeConfig, load_model
from kvloft.index.base import make_retriever
from kvloft.scheduler.budget import CACHE_HEADROOM, plan_memory, resolve_cache_bytes, weight_bytes
from kvloft.scheduler.params import SchedulerParams

GiB = 2**30
LLAMA = ModelConfig.from_name("llama3-8b")


def test_weight_bytes_match_the_model():
    model = load_model("tiny", device="cpu", dtype="float32")
    assert weight_bytes(model.config, 4) == model.weight_bytes
    smol = ModelConfig.from_name("smollm2-135m")  # tied embeddings are counted once
    untied = dataclasses.replace(smol, tie_word_embeddings=False)
    assert weight_bytes(untied, 2) - weight_bytes(smol, 2) == smol.vocab_size * smol.hidden_size * 2
    qwen = ModelConfig.from_name("qwen2.5-7b-1m")  # projection biases
    assert weight_bytes(qwen, 2) == pytest.approx(15.23e9, rel=0.01)


def test_static_and_index_follow_the_tiers_and_the_mirror():
    cfg = ModelConfig.from_name("tiny")
    rcfg = RetrievalConfig(method="exact", budget=8, n_sink=4, n_window=16, options={"chunk_rows": 64})
    plan = plan_memory(cfg, rcfg, RuntimeConfig(), 500, torch.float32)
    assert plan.n_host == 480
    # static: the tier's own buffers; index: the exact retriever's mirror after build
    from kvloft.tiers.kvcache import TieredKVCache

    # the plan is a GPU's: its window ring has room for CacheConfig's evict_batch on CUDA
    kv = TieredKVCache(cfg, n_sink=4, n_window=16, host_chunk=4096, device=torch.device("cpu"), dtype=torch.float32,
                       evict_batch=CacheConfig().resolved_evict_batch("cuda"))
    assert plan.static == kv.bytes()["static"]
    r = make_retriever(rcfg, cfg)
    for layer in range(cfg.n_layers):
        r.build(layer, torch.randn(cfg.n_kv_heads, 480, cfg.head_dim), None)
    assert plan.index == sum(store.nbytes for store in r.keys.values())
    assert plan.host_kv == kv.host_bytes_after(480)


def test_graph_index_lives_on_the_host_and_dense_holds_everything():
    runtime = RuntimeConfig()
    graph = plan_memory(LLAMA, RetrievalConfig(method="attention_graph"), runtime, 1 << 20, torch.bfloat16)
    exact = plan_memory(LLAMA, RetrievalConfig(method="exact"), runtime, 1 << 20, torch.bfloat16)
    assert graph.index == 0 and graph.host_index > 0
    assert exact.index == 64 * GiB  # 1M keys x 8 heads x 128 x 2 B x 32 layers, whole chunks
    hip_host = plan_memory(LLAMA, RetrievalConfig(method="hip", options={"keys_on": "host"}), runtime, 1 << 20,
                           torch.bfloat16)
    assert hip_host.host_index == 0  # it reads the host tier's keys in place: on the device only its stage
    assert hip_host.index == 43008 * 8 * 32 + 3 * hip_host.n_host * 8  # masks, and the counting arange
    # 1M tokens within a 24 GiB card: weights, static tier, a streamed/sparse prefill's workspace
    fits = plan_memory(LLAMA, RetrievalConfig(method="hip", options={"keys_on": "host"}),
                       RuntimeConfig(gpu_memory_budget="24GiB", prefill_chunk=4096), 1 << 20, torch.bfloat16)
    assert fits.total <= 24 * GiB and fits.host_kv >= 128 * GiB
    dense = plan_memory(LLAMA, RetrievalConfig(method="dense"), runtime, 128 * 1024, torch.bfloat16)
    assert dense.static == 16 * GiB and dense.n_host == 0


def test_refusal_names_the_longest_context_that_fits():
    runtime = RuntimeConfig(gpu_memory_budget="24GiB")
    rcfg = RetrievalConfig(method="exact")
    with pytest.raises(ValueError, match="over gpu_memory_budget=24.00 GiB") as err:
        plan_memory(LLAMA, rcfg, runtime, 1 << 20, torch.bfloat16)
    longest = int(str(err.value).split("at most ")[1].split(" tokens")[0])
    assert plan_memory(LLAMA, rcfg, runtime, longest, torch.bfloat16).fits
    with pytest.raises(ValueError):
        plan_memory(LLAMA, rcfg, runtime, longest + 1, torch.bfloat16)
    # the key mirror is what runs out: attention_graph decodes 1M tokens within the same budget
    plan_memory(LLAMA, RetrievalConfig(method="attention_graph"), runtime, 1 << 20, torch.bfloat16)


def test_refusal_names_the_cache_that_fits():
    runtime = RuntimeConfig(gpu_memory_budget="24GiB", scheduler="overlap")
    rcfg = RetrievalConfig(method="hip")
    params = SchedulerParams(cache_bytes="6GiB")
    with pytest.raises(ValueError, match=r"cache_bytes<=(\d+)") as err:
        plan_memory(LLAMA, rcfg, runtime, 128 * 1024, torch.bfloat16, scheduler=params)
    room = int(str(err.value).split("cache_bytes<=")[1].split(")")[0])
    fitted = plan_memory(LLAMA, rcfg, runtime, 128 * 1024, torch.bfloat16, scheduler=params.replace(cache_bytes=room))
    assert fitted.row_cache > 0 and fitted.total <= 24 * GiB


def test_nothing_fits_says_so():
    with pytest.raises(ValueError, match="Even an empty context"):
        plan_memory(LLAMA, RetrievalConfig(method="exact"), RuntimeConfig(gpu_memory_budget="8GiB"), 1000,
                    "bfloat16")


def test_auto_cache_shrinks_to_the_headroom():
    rcfg = RetrievalConfig(method="exact", budget=2048)
    params = SchedulerParams()
    free = resolve_cache_bytes(LLAMA, rcfg, RuntimeConfig(), params, torch.bfloat16, "cuda")
    assert free == 2048 * 8 * (2 * 8 * 128 * 2) * 32  # budget x H_kv token rows per layer
    runtime = RuntimeConfig(gpu_memory_budget="24GiB", scheduler="overlap")
    tight = resolve_cache_bytes(LLAMA, rcfg, runtime, params, torch.bfloat16, "cuda",
                                CacheConfig(max_context=128 * 1024))
    assert 0 < tight < free
    plan = plan_memory(LLAMA, rcfg, runtime, 128 * 1024, torch.bfloat16, cache_bytes=tight)
    spare = 24 * GiB // CACHE_HEADROOM  # room kept for what the plan does not model
    assert plan.fits and spare <= 24 * GiB - plan.total < plan.row_cache + spare
    assert resolve_cache_bytes(LLAMA, rcfg, runtime, params.replace(cache_bytes="1MiB"), "bfloat16", "cuda") == 2**20


def test_bad_arguments():
    with pytest.raises(ValueError, match="n_tokens"):
        plan_memory(LLAMA, RetrievalConfig(), RuntimeConfig(), -1, torch.bfloat16)
    with pytest.raises(ValueError, match="unknown dtype"):
        plan_memory(LLAMA, RetrievalConfig(), RuntimeConfig(), 10, "bf16")


@pytest.mark.gpu
def test_gpu_session_refuses_before_allocating():
    from kvloft import Session

    model = load_model("tiny", device="cuda", dtype="bfloat16")
    budget = model.weight_bytes + 2**20
    runtime = RuntimeConfig(gpu_memory_budget=budget, scheduler="overlap", progress=False)
    before = torch.cuda.memory_allocated()
    with pytest.raises(ValueError, match="context of at most"):
        Session(model, RetrievalConfig(method="exact", budget=64, n_sink=4, n_window=64), runtime,
                CacheConfig(max_context=100_000))
    assert torch.cuda.memory_allocated() - before < 2**20


def test_int4_plan_counts_the_tinygemm_layout_on_bf16():
    """A CUDA bf16 model's int4 linears hold tinygemm's layout and bf16 scales/zeros beside
    the fp16 scales and mins: 4 more bytes per group and (8-padded) output row, by hand."""
    from kvloft.config import PRESETS
    from kvloft.scheduler.weight_storage import packed_bytes

    assert packed_bytes(4096, 4096, 4, 128, True) == 4096 * 2048 + 4 * 4096 * 32
    assert packed_bytes(4100, 4096, 4, 128, True, tinygemm=True) == 4104 * 2048 + 4 * 4104 * 32 + 4 * 4100 * 32
    llama = PRESETS["llama3-8b"]
    rt = RuntimeConfig(weights="int4", gpu_memory_budget="24GiB")
    rc = RetrievalConfig(method="hip", budget=2048)
    bf16 = plan_memory(llama, rc, rt, 1024, "bfloat16", cache_cfg=CacheConfig(), check=False)
    fp16 = plan_memory(llama, rc, rt, 1024, "float16", cache_cfg=CacheConfig(), check=False)
    assert bf16.weights == weight_bytes(llama, 2, "int4", 128, tinygemm=True)
    assert fp16.weights == weight_bytes(llama, 2, "int4", 128)
    assert 0 < bf16.weights - fp16.weights < 0.3 * 2**30 and bf16.weights / 2**30 < 5.5


QWEN = ModelConfig.from_name("qwen2.5-0.5b-shape")


@pytest.mark.parametrize("cfg", [LLAMA, QWEN], ids=["llama3-8b", "qwen-0.5b"])
@pytest.mark.parametrize("method", ["exact", "dense"])
@pytest.mark.parametrize("n", [32 * 1024, 128 * 1024])
def test_auto_prefill_chunk_is_the_largest_that_fits_24gib(cfg, method, n):
    from kvloft.scheduler.budget import PREFILL_CHUNKS, SELECTING_CHUNK_MAX, pick_prefill_chunk

    rcfg, runtime = RetrievalConfig(method=method), RuntimeConfig(gpu_memory_budget="24GiB")
    chunk = pick_prefill_chunk(cfg, rcfg, runtime, n, "bfloat16")
    plan = plan_memory(cfg, rcfg, runtime, n, "bfloat16", check=False)
    assert plan.prefill_chunk == chunk  # a plan for prefill_chunk=None prices the choice

    def fits(c: int) -> bool:
        p = plan_memory(cfg, rcfg, dataclasses.replace(runtime, prefill_chunk=c), n, "bfloat16", check=False)
        return p.resident + p.prefill_workspace <= 24 * GiB - 24 * GiB // CACHE_HEADROOM

    cap = SELECTING_CHUNK_MAX if method != "dense" and n > rcfg.prefill_dense_tokens else max(PREFILL_CHUNKS)
    larger = [c for c in PREFILL_CHUNKS if chunk < c <= cap]
    assert not any(fits(c) for c in larger)
    assert fits(chunk) or chunk == PREFILL_CHUNKS[-1]


def test_auto_prefill_chunk_by_hand():
    from kvloft.scheduler.budget import pick_prefill_chunk

    runtime = RuntimeConfig(gpu_memory_budget="24GiB")
    exact = RetrievalConfig(method="exact")
    # Llama-3-8B at 128K: weights 14.96 + index 8 + static 0.08 GiB leave ~0.58 GiB after the
    # headroom; a 2048-token chunk needs ~0.52 (activations, RoPE's fp32 temporaries), 4096 ~0.99
    assert pick_prefill_chunk(LLAMA, exact, runtime, 128 * 1024, "bfloat16") == 2048
    assert pick_prefill_chunk(LLAMA, exact, runtime, 32 * 1024, "bfloat16") == 16384
    assert pick_prefill_chunk(QWEN, RetrievalConfig(method="dense"), runtime, 128 * 1024, "bfloat16") == 16384
    # an explicit chunk wins; free memory bounds the choice; nothing fits: the smallest
    assert pick_prefill_chunk(LLAMA, exact, dataclasses.replace(runtime, prefill_chunk=333), 1 << 17, "bfloat16") == 333
    assert pick_prefill_chunk(QWEN, exact, runtime, 1 << 17, "bfloat16", free_bytes=300 * 2**20) == 4096
    assert pick_prefill_chunk(LLAMA, exact, RuntimeConfig(gpu_memory_budget="23GiB"), 1 << 17, "bfloat16") == 512
    # no budget and no free-memory bound: the largest, 4096 where chunks select their host rows
    # (exact past prefill_dense_tokens, extrapolate)
    assert pick_prefill_chunk(LLAMA, exact, RuntimeConfig(), 32768, "bfloat16") == 16384
    assert pick_prefill_chunk(LLAMA, exact, RuntimeConfig(), 32769, "bfloat16") == 4096
    assert pick_prefill_chunk(LLAMA, RetrievalConfig(method="dense"), RuntimeConfig(), 1 << 17, "bfloat16") == 16384
    extrapolate = RetrievalConfig(method="exact", position_mode="extrapolate")
    assert pick_prefill_chunk(LLAMA, extrapolate, RuntimeConfig(), 8192, "bfloat16") == 4096
    assert pick_prefill_chunk(LLAMA, extrapolate, RuntimeConfig(prefill_chunk=16384), 8192, "bfloat16") == 16384


def test_flash_prefill_is_priced_without_logits():
    # kernels "auto" on CUDA: FlashAttention-2 (no [chunk, keys] logits); "reference": fp32 logits
    rcfg = RetrievalConfig(method="dense")
    flash = plan_memory(LLAMA, rcfg, RuntimeConfig(prefill_chunk=4096, kernels="auto"), 1 << 17, "bfloat16")
    ref = plan_memory(LLAMA, rcfg, RuntimeConfig(prefill_chunk=4096, kernels="reference"), 1 << 17, "bfloat16")
    logits = 32 * 4096 * (1 << 17) * 4
    assert ref.prefill_workspace - flash.prefill_workspace >= logits
    assert flash.prefill_workspace < 1 * GiB
    fp32 = plan_memory(LLAMA, rcfg, RuntimeConfig(prefill_chunk=4096), 1 << 17, "float32")  # no flash in fp32
    assert fp32.prefill_workspace >= logits


def test_cache_is_sized_before_the_auto_chunk():
    # the row cache keeps its size: the auto chunk takes what the cache leaves, not the reverse
    rcfg = RetrievalConfig(method="exact", budget=2048)
    runtime = RuntimeConfig(gpu_memory_budget="24GiB", scheduler="overlap")
    cache = resolve_cache_bytes(LLAMA, rcfg, runtime, SchedulerParams(), torch.bfloat16, "cuda",
                                CacheConfig(max_context=64 * 1024))
    explicit = resolve_cache_bytes(LLAMA, rcfg, dataclasses.replace(runtime, prefill_chunk=512), SchedulerParams(),
                                   torch.bfloat16, "cuda", CacheConfig(max_context=64 * 1024))
    assert cache == explicit > 0


def test_hip_host_counts_what_it_holds_per_host_dtype():
    """hip keys_on='host' reads the host tier in place, model-dtype or 8-bit: the plan's host
    bytes at 1M tokens for an fp8 tier are the packed rows alone (0.516 of bf16's: codes + a
    scale per head, and the position), no key copy; where it cannot read in place (a host chunk
    not a multiple of chunk_sizes[0]) the plan counts its pinned bf16 copy and says why."""
    rcfg = RetrievalConfig(method="hip", options={"keys_on": "host"})
    hkv, d = LLAMA.n_kv_heads, LLAMA.head_dim
    plans = {hd: plan_memory(LLAMA, rcfg, RuntimeConfig(), 1 << 20, torch.bfloat16,
                             cache_cfg=CacheConfig(host_chunk_tokens=1 << 20, host_dtype=hd)) for hd in (None, "fp8")}
    assert plans[None].host_index == plans["fp8"].host_index == 0
    ratio = (plans["fp8"].host_kv + plans["fp8"].host_index) / (plans[None].host_kv + plans[None].host_index)
    assert ratio == pytest.approx((2 * hkv * (d + 4) + 8) / (4 * hkv * d + 8)) and 0.51 < ratio < 0.52
    odd = plan_memory(LLAMA, rcfg, RuntimeConfig(), 1 << 20, torch.bfloat16,
                      cache_cfg=CacheConfig(host_chunk_tokens=1000, host_dtype="fp8"))
    assert odd.host_index == 64 * GiB and any("not a multiple of chunk_sizes[0]=256" in n for n in odd.notes)
    assert odd.host_kv + odd.host_index > 125 * GiB > plans["fp8"].host_kv  # what bench/decode.py refuses


@pytest.mark.parametrize("host_dtype", [None, "fp8"])
@pytest.mark.parametrize("host_chunk", [32, 24])  # 24: not a multiple of chunk_sizes[0] = 16, so a copy
def test_hip_host_plan_matches_a_session(host_dtype, host_chunk):
    """The plan's host_kv and host_index equal what a small CPU session holds: its host tier's
    bytes and its retriever's own key bytes (0 where it reads the tier in place)."""
    model = load_model("tiny", device="cpu", dtype="float32", seed=3)
    rcfg = RetrievalConfig(method="hip", budget=24, n_sink=4, n_window=16,
                           options={"chunk_sizes": (16, 8, 4), "kept_tokens": (64, 32, 16), "refresh_steps": (4, 2, 2),
                                    "chunk_rows": 32, "keys_on": "host"})
    cache = CacheConfig(host_chunk_tokens=host_chunk, evict_batch=0, host_dtype=host_dtype)
    from kvloft import Session

    s = Session(model, rcfg, RuntimeConfig(prefill_chunk=64, progress=False, kernels="reference"), cache)
    s.feed(list(range(150)))
    s.step(5)
    plan = plan_memory(model.config, rcfg, RuntimeConfig(), len(s), torch.float32, cache_cfg=cache)
    assert plan.n_host == s.backend.cache[0].n_host == 131
    assert plan.host_kv == s.backend.cache.bytes()["host"]
    assert plan.host_index == s.backend.retriever.key_bytes()
    assert (plan.host_index == 0) == (host_chunk % 16 == 0)


def test_dense_growth_stays_within_the_planned_capacity():
    """DenseKV grows to the plan's capacity (the power of two over the rows, at least 1024), not
    to 2x a capacity the last append set: 3000 rows then one more held 6000 rows where the plan
    counts 4096."""
    from kvloft.tiers.dense import DenseKV, dense_capacity

    cfg = ModelConfig.from_name("tiny")
    kv = DenseKV(cfg, torch.device("cpu"), torch.float32)
    row = torch.randn(3000, cfg.n_kv_heads, cfg.head_dim)
    for n, rows in ((3000, row), (3001, row[:1]), (4097, row[:1096])):
        kv.append(rows, rows)
        plan = plan_memory(cfg, RetrievalConfig(method="dense"), RuntimeConfig(), n, torch.float32)
        assert kv.n == n and kv.k.shape[0] == dense_capacity(n)
        assert kv.nbytes() * cfg.n_layers <= plan.static  # the plan counts every layer's buffer
    assert torch.equal(kv.kv()[0][3001:4097], row[:1096]) and torch.equal(kv.kv()[0][:3000], row)


def _device_parts(s) -> dict[str, int]:
    """Bytes a CPU session holds where a CUDA one holds them on the device: the static tier (or
    the dense KV) and the retriever's own key copy (none where it reads the host tier in place)."""
    be, r = s.backend, s.backend.retriever if hasattr(s.backend, "retriever") else None
    if r is None:
        return {"static": sum(layer.nbytes() for layer in be.layers), "index": 0}
    if hasattr(r, "key_bytes"):  # hip: its copies, stage masks and counting arange (one storage each)
        kept = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                for st in r.state.values() for t in st.masks if t is not None}
        if r._counting is not None:
            kept[r._counting.untyped_storage().data_ptr()] = r._counting.untyped_storage().nbytes()
        index = r.key_bytes() + sum(kept.values())
    elif hasattr(r, "keys"):  # exact
        index = sum(store.nbytes for store in r.keys.values())
    else:  # tokenselect: its key copy, each layer's last query and ids
        index = sum(st.keys.nbytes + sum(t.nbytes for t in (st.last_q, st.last_ids) if t is not None)
                    for st in r.layers.values())
    return {"static": be.cache.bytes()["static"], "index": index}


@pytest.mark.parametrize("method,options", [
    ("exact", {"keys_on": "device", "chunk_rows": 32}),
    ("hip", {"keys_on": "device"}),
    ("hip", {"keys_on": "host"}),
    ("tokenselect", {"chunk_rows": 32}),
    ("dense", {}),
], ids=["exact-device", "hip-device", "hip-host", "tokenselect", "dense"])
def test_plan_bounds_what_a_session_holds(method, options):
    """The plan's static and index parts are upper bounds of what a small CPU session holds after
    a prefill and decode steps (the parts a CUDA session keeps on the device), and the two
    together within one chunk of rows per layer of it: both count whole chunks of the same
    rows, so a larger gap means the plan prices memory the code does not hold."""
    from kvloft import Session

    model = load_model("tiny", device="cpu", dtype="float32", seed=3)
    cfg = model.config
    if method == "hip":
        options = {"chunk_sizes": (16, 8, 4), "kept_tokens": (64, 32, 16), "refresh_steps": (4, 2, 2),
                   "chunk_rows": 32, **options}
    rcfg = RetrievalConfig(method=method, budget=24, n_sink=4, n_window=16, options=options)
    cache = CacheConfig(host_chunk_tokens=32, evict_batch=8)
    chunk = 512 if method == "dense" else 64
    s = Session(model, rcfg, RuntimeConfig(prefill_chunk=chunk, progress=False, kernels="reference"), cache)
    s.feed([t % 500 + 1 for t in range(1030 if method == "dense" else 150)])  # dense: past its first 1024 rows
    s.step(6)
    plan = plan_memory(cfg, rcfg, RuntimeConfig(), len(s), torch.float32, cache_cfg=cache)
    held = _device_parts(s)
    assert held["static"] <= plan.static and held["index"] <= plan.index, (held, plan.as_dict())
    row = 2 * cfg.n_kv_heads * cfg.head_dim * 4
    slack = 32 * row * cfg.n_layers if method != "dense" else 0  # one 32-row chunk per layer
    if method == "hip":  # hip's static part prices the stable selection's device rows of a CUDA step
        slack += rcfg.budget * row * cfg.n_layers + 3 * plan.n_host * 8  # and a counting arange grown at most
    assert plan.static + plan.index - slack <= held["static"] + held["index"]
