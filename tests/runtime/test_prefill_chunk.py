"""The prefill chunk a session takes, and (CUDA) what one chunk really allocates against the
memory plan's workspace estimate (scheduler/budget.py)."""

from __future__ import annotations

import pytest
import torch

from kvloft import CacheConfig, RetrievalConfig, RuntimeConfig, Session, load_model
from kvloft.scheduler.budget import pick_prefill_chunk, plan_memory

MiB = 2**20


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny", device="cpu", dtype="float32")


def test_cpu_session_takes_8192_or_the_explicit_chunk(tiny):
    s = Session(tiny, RetrievalConfig(method="dense"), RuntimeConfig(device="cpu", progress=False))
    s.feed(list(range(1, 40)))
    assert s.prefill_chunk == 8192
    selecting = RetrievalConfig(method="exact", budget=16, n_sink=4, n_window=8, prefill_dense_tokens=8)
    s = Session(tiny, selecting, RuntimeConfig(device="cpu", progress=False))
    s.feed(list(range(1, 40)))
    assert s.prefill_chunk == 4096  # the chunk selects its host rows: a quality setting, capped as on CUDA
    s = Session(tiny, RetrievalConfig(method="dense"), RuntimeConfig(device="cpu", progress=False, prefill_chunk=16))
    s.feed(list(range(1, 40)))
    assert s.prefill_chunk == 16


def _one_chunk_peak(session: Session, ids: list[int], chunk: int) -> tuple[int, int]:
    """Feed ids but the last chunk, then the last chunk alone: (peak bytes over what stays
    allocated after it, bytes allocated after it) on the current CUDA device."""
    session.feed(ids[:-chunk])
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    session.feed(ids[-chunk:])
    torch.cuda.synchronize()
    after = torch.cuda.memory_allocated()
    return torch.cuda.max_memory_allocated() - max(before, after), after


@pytest.mark.gpu
@pytest.mark.parametrize("method", ["dense", "exact"])
@pytest.mark.parametrize("chunk", [512, 4096])
def test_chunk_workspace_within_the_plan_cuda(method, chunk):
    # the plan's prefill workspace is an upper bound of a chunk's transients, and not a loose one
    model = load_model("qwen2.5-0.5b-shape", device="cuda", dtype="bfloat16")
    n = 16384
    rcfg = RetrievalConfig(method=method, budget=1024, n_sink=64, n_window=512)
    runtime = RuntimeConfig(progress=False, prefill_chunk=chunk)
    ids = torch.randint(1, model.config.vocab_size, (n,), generator=torch.Generator().manual_seed(0)).tolist()
    s = Session(model, rcfg, runtime, CacheConfig())
    s.feed(ids[: 2 * chunk])  # kernels and cuBLAS workspaces created before the measurement
    s.reset()
    measured, _ = _one_chunk_peak(s, ids, chunk)
    est = plan_memory(model.config, rcfg, runtime, n, "bfloat16").prefill_workspace
    assert measured <= est, f"a {chunk}-token chunk took {measured / MiB:.0f} MiB, the plan {est / MiB:.0f} MiB"
    assert est <= 3 * measured + 64 * MiB, f"plan {est / MiB:.0f} MiB for {measured / MiB:.0f} MiB measured"


@pytest.mark.gpu
def test_cuda_session_takes_the_plans_chunk():
    model = load_model("qwen2.5-0.5b-shape", device="cuda", dtype="bfloat16")
    rcfg = RetrievalConfig(method="exact", budget=1024)
    budget = model.weight_bytes + 600 * MiB  # room for a mid-sized chunk only
    runtime = RuntimeConfig(progress=False, gpu_memory_budget=budget)
    s = Session(model, rcfg, runtime)
    s.feed(list(range(1, 8193)))
    want = pick_prefill_chunk(model.config, rcfg, runtime, 8192, "bfloat16")
    assert s.prefill_chunk == want < 8192  # an 80 GiB card has the free memory: the budget decides
    assert pick_prefill_chunk(model.config, rcfg, RuntimeConfig(gpu_memory_budget=2**40), 8192, "bfloat16") == 16384


def test_dense_session_through_the_lower_right_sdpa_equals_the_reference(tiny):
    # the CUDA route of a dense chunk (public SDPA, causal_lower_right, enable_gqa) run on the
    # CPU inside a session: chunks of 16 over up to 80 earlier tokens, 9 query heads over 3
    import dataclasses

    from kvloft.kernels import REFERENCE, flash

    ids = torch.randint(1, tiny.config.vocab_size, (87,), generator=torch.Generator().manual_seed(1)).tolist()
    logits = []
    for ops in (REFERENCE, dataclasses.replace(REFERENCE, name="sdpa", causal_attend=flash.sdpa_causal)):
        s = Session(tiny, RetrievalConfig(method="dense"), RuntimeConfig(device="cpu", progress=False, prefill_chunk=16))
        s.ops = s.backend.ops = ops
        s.feed(ids)
        logits.append(s._last_logits)
    torch.testing.assert_close(logits[1], logits[0], atol=1e-4, rtol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("rcfg", [
    RetrievalConfig(method="dense"),
    RetrievalConfig(method="exact", budget=10_000, n_sink=4, n_window=32),  # streamed host chunks
    RetrievalConfig(method="exact", budget=64, n_sink=4, n_window=32, prefill_dense_tokens=60),  # sparse
], ids=["dense", "exact-streamed", "exact-sparse"])
def test_cuda_bf16_prefill_through_flash_equals_the_reference_kernels(rcfg):
    # flash (lower-right, GQA 9/3 in place), the zero-copy row gather: the reference kernels' logits
    model = load_model("tiny", device="cuda", dtype="bfloat16", seed=11)
    ids = torch.randint(1, model.config.vocab_size, (300,), generator=torch.Generator().manual_seed(2)).tolist()
    logits = []
    for kernels in ("triton", "reference"):
        s = Session(model, rcfg, RuntimeConfig(progress=False, prefill_chunk=24, kernels=kernels),
                    CacheConfig(host_chunk_tokens=32))
        s.feed(ids)
        logits.append(s._last_logits.float())
    err = (logits[0] - logits[1]).norm() / logits[1].norm()
    assert err < 3e-2, err
