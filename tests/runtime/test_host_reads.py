"""Host reads per decode step (kvloft/runtime/host_reads.py): the counter counts what it should,
and no method's decode path reads device values more often than the bounds below.

On CUDA every read (item, tolist, bool of a tensor, cpu(), nonzero, a boolean mask, ...) waits
for the device to finish all queued work; a read per layer keeps the host from queueing the
next layer's launches while the current ones run (bench/host_reads.py, docs/performance.md).
The count is taken on the CPU, where the same code runs: at two model depths, so that the reads
each layer adds are told apart from the per-step ones (sampling, the engine's plan).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from kvloft import CacheConfig, RetrievalConfig, RuntimeConfig, Session
from kvloft.config import PRESETS
from kvloft.kernels import kernel_set
from kvloft.runtime.host_reads import count_host_reads, decode_reads
from kvloft.runtime.loader import random_model

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS = 16  # one whole refresh cycle of HiP's default refresh_steps (16, 8, 4)
HIP = {"chunk_sizes": (32, 8, 4), "kept_tokens": (256, 96, 32)}  # stages that run on a 600-token context
METHODS = {"dense": {}, "exact": {}, "hip": HIP, "hip:keys_on=host": {**HIP, "keys_on": "host"},
           "tokenselect": {}, "recycled": {}, "actqkv": {}}

# Reads each layer adds to a decode step of one session, at most (the bound the code reaches;
# a new read per layer fails here: remove it, or raise the bound saying why it is needed):
PER_LAYER = {
    "dense": 0,
    "exact": 0,  # top-k ids stay on the device; the attention gathers by them
    "recycled": 0,
    "tokenselect": 1,  # the selection cache's check: a hit skips the scoring pass, a host decision
    "actqkv": 1,  # the ranked blocks, read once for the halo walk over host integers (halo_spans)
    # the torch stage reference (the CPU's; CUDA runs the Triton stages: 0, test below): each halving
    # of a refreshed stage checks its probe ids for padding and gathers them (an id range check):
    # (5/16 + 3/8 + 2/4) halvings a layer-step with refresh_steps (16, 8, 4), chunks (32, 8, 4)
    "hip": 2.5,
    "hip:keys_on=host": 2.5,
}
# Reads of a decode step besides the layers', per session: the logits sampled from (a copy to the
# host; its finite check and the token are then host reads), the end-of-call finite check (1/STEPS).
PER_STEP = 3 + 1 / STEPS
PER_STEP_EXTRA = {
    "actqkv": 3,  # the budget split: every layer's entropy read together, their sum, the shares
    "hip": 1,  # the depths' refresh patterns differ over one cycle (stagger): the fit leaves < 1
    "hip:keys_on=host": 1,
}
# An Engine step of 2 rows: the plan's order, tokens and evictions (host ints, one read each), the
# rows' finite check and the greedy tokens; generate's first argmax (1/STEPS)
ENGINE_STEP = 5 + 3 / STEPS


@pytest.fixture(scope="module")
def models():
    return {n: random_model(dataclasses.replace(PRESETS["tiny"], n_layers=n), device=torch.device("cpu"),
                            dtype=torch.float32, seed=0) for n in (2, 4)}


def _sessions(model, method: str, n: int, cuda_route: bool = False) -> list[Session]:
    name = method.split(":")[0]
    options = dict(METHODS[method])
    if cuda_route and name == "hip":
        options["kernel"] = "triton"  # kernel="auto" on CUDA
    rcfg = RetrievalConfig(method=name, budget=32, n_sink=4, n_window=32, options=options)
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, model.config.vocab_size, (600,), generator=gen).tolist()
    out = []
    for i in range(n):
        # evict_batch=64 as on CUDA: the window's next copy down comes after the counted steps
        s = Session(model, rcfg, RuntimeConfig(progress=False, kernels="reference", prefill_chunk=256),
                    CacheConfig(evict_batch=64))
        s.feed(prompt[i:] + prompt[:i])
        if cuda_route:  # decode as a CUDA session's: Triton kernels reading the pinned chunks in place
            s.backend.ops = kernel_set("triton", "cpu")
            for t in s.backend.cache.layers:
                t._host_k.pin = t._host_v.pin = True
        out.append(s)
    return out


def _fit(models, method: str, n_sessions: int, steps: int = STEPS, cuda_route: bool = False):
    """(reads per layer and step, reads per step besides) from the two depths, and the sites."""
    got = {n: decode_reads(_sessions(m, method, n_sessions, cuda_route), steps) for n, m in models.items()}
    per_layer = (got[4].total - got[2].total) / 2 / steps
    return per_layer, got[2].total / steps - 2 * per_layer, got[2].sites


def test_the_counter_counts_each_kind_of_read_once_and_restores_torch():
    """Fails if a kind of read goes uncounted, a non-read is counted, a nested read counts twice,
    or the patched calls outlive the block."""
    x = torch.arange(6.0)
    mask = x > 2
    here = Path(__file__).resolve().parent
    with count_host_reads(root=here) as reads:
        x[0].item()
        x.tolist()
        bool(x[1] > 0)
        int(x[2])
        x[mask]
        x[mask] = torch.zeros(3)
        x[mask] = 0.0  # a masked fill: no read
        x.unique()  # Tensor.unique calls torch.unique: one read
        torch.nonzero(mask)
        x.to("cpu")
        x.to(x.device)  # a device taken from a tensor: not counted (see the module docstring)
        x.cpu()
        x * 2  # no read
    kinds = sorted(site.split(" ")[1] for site in reads.sites.elements())
    assert kinds == sorted(["item", "tolist", "bool", "int", "getitem", "setitem", "unique", "nonzero", "to",
                            "cpu"]), kinds
    assert all(site.startswith("tests/runtime/test_host_reads.py:") for site in reads.sites)
    assert torch.Tensor.item is torch._C.TensorBase.item and "__bool__" not in vars(torch.Tensor)
    with count_host_reads() as outside:  # reads made outside kvloft are not counted
        x[0].item()
    assert outside.total == 0


def test_the_counter_finds_a_read_inside_kvloft():
    """A selection counted by RetrieverStats is summed on the device and read once, when asked
    for: the read is charged to that line of kvloft/index/base.py."""
    from kvloft.index.base import RetrieverStats, Selection

    stats = RetrieverStats()
    with count_host_reads() as reads:
        for _ in range(5):
            stats.record(Selection(ids=torch.tensor([3, 1, -1]), scanned=3))
        assert reads.total == 0
        assert stats.selected == 10
    assert reads.total == 1 and next(iter(reads.sites)).startswith("kvloft/index/base.py:")


@pytest.mark.parametrize("method", sorted(METHODS))
def test_session_decode_reads_stay_within_bounds(models, method):
    per_layer, per_step, sites = _fit(models, method, 1)
    why = f"{method}: {per_layer:.3f} reads per layer, {per_step:.3f} per step; sites {dict(sites)}"
    assert per_layer <= PER_LAYER[method] + 1e-9, why
    assert per_step <= PER_STEP + PER_STEP_EXTRA.get(method, 0) + 1e-9, why


@pytest.mark.parametrize("method", ["exact", "hip", "tokenselect", "actqkv"])
def test_engine_decode_reads_stay_within_bounds(models, method):
    """Two rows through kvloft.Engine: each row's layers read as its session's do."""
    per_layer, per_step, sites = _fit(models, method, 2)
    why = f"{method}: {per_layer:.3f} reads per layer, {per_step:.3f} per step; sites {dict(sites)}"
    assert per_layer <= 2 * PER_LAYER[method] + 1e-9, why
    assert per_step <= ENGINE_STEP + 2 * PER_STEP_EXTRA.get(method, 0) + 1e-9, why


@pytest.mark.parametrize("method", ["exact", "hip"])
def test_cuda_route_reads_nothing_per_layer(models, method):
    """The route a CUDA session decodes on (Triton kernels through the interpreter, the host tier
    read in place, HiP's Triton stages): exact and HiP read no device value in any layer."""
    per_layer, per_step, sites = _fit(models, method, 1, steps=4, cuda_route=True)
    assert per_layer == 0, (per_layer, dict(sites))
    assert per_step <= 3 + 1 / 4 + 1e-9, (per_step, dict(sites))
