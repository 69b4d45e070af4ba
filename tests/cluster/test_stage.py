"""Pipeline stages without Ray: StageActor objects in this process, their record files, the
layer planner.

Checked: two stages fed each other's hidden states give the single-process session's logits;
a stage rebuilt from its record files (cut at a given token) continues bitwise as the stage
that never stopped, and its files end byte-identical; a damaged record, files shorter than
the session confirmed and another setup's files are refused; the planner splits layers by
memory and refuses, with the numbers, a context no split can hold.
"""

import dataclasses
import filecmp

import pytest
import torch

import kvloft
from kvloft.cluster import PipelineConfig
from kvloft.cluster.plan import layer_cost, split_by_memory, split_even
from kvloft.cluster.records import CorruptRecord
from kvloft.cluster.stage import StageActor, StoreNotOpen, stage_weights
from kvloft.cluster.store import StageSpec

RETRIEVAL = kvloft.RetrievalConfig(method="exact", budget=8, n_sink=4, n_window=16)
RUNTIME = kvloft.RuntimeConfig(progress=False, prefill_chunk=32)
CACHE = kvloft.CacheConfig()
SPLIT = [(0, 1), (1, 2)]


@pytest.fixture(scope="module")
def model():
    return kvloft.load_model("tiny", device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def prompt():
    return torch.randint(0, 512, (90,), generator=torch.Generator().manual_seed(7)).tolist()


def stages(model):
    out = []
    for i, (a, b) in enumerate(SPLIT):
        st = StageActor()
        st.load(model.config, (a, b), i == len(SPLIT) - 1, stage_weights(model.net, a, b, i == len(SPLIT) - 1),
                "float32")
        out.append(st)
    return out


def specs(model, root, retrieval=RETRIEVAL):
    return [StageSpec(directory=str(root / f"stage-{i}"), layers=r, model=model.config, retrieval=retrieval,
                      runtime=RUNTIME, cache=CACHE) for i, r in enumerate(SPLIT)]


def forward(model, sts, sps, ids, start, decoding, feed_after=0):
    with torch.inference_mode():
        x = model.net.embed_tokens(torch.tensor(ids))
    pos = torch.arange(start, start + len(ids))
    for st, sp in zip(sts, sps):
        x = st.forward(sp.directory, x, pos, decoding, feed_after, RETRIEVAL.budget)
    return x


def drive(model, sts, sps, prompt, steps, start_step=0, last=None):
    """Prefill (unless start_step > 0) then greedy steps; the logits of each."""
    out = []
    if start_step == 0:
        for sp, st in zip(sps, sts):
            st.open(sp, 0)
        n = len(prompt)
        for i in range(0, n, 32):
            part = prompt[i : i + 32]
            last = forward(model, sts, sps, part, i, False, n - i - len(part))
        for sp, st in zip(sps, sts):
            st.build(sp.directory)
        out.append(last)
    pos = len(prompt) + start_step
    for _ in range(steps):
        last = forward(model, sts, sps, [int(last.argmax())], pos, True)
        pos += 1
        out.append(last)
    return out


def test_stages_equal_single_process_and_replay_is_bitwise(model, prompt, tmp_path):
    ref = kvloft.Session(model, RETRIEVAL, RUNTIME)
    ref.feed(prompt)
    want = [ref.last_logits.clone()]
    for _ in range(6):
        want.append(ref.step(int(want[-1].argmax())).clone())
    sts, sps = stages(model), specs(model, tmp_path / "a")
    got = drive(model, sts, sps, prompt, 6)
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        torch.testing.assert_close(g, w, atol=2e-5, rtol=1e-5, msg=lambda m, i=i: f"logits {i}: {m}")

    # the same run, stopped after 3 steps; stage 1 dies; a new process opens its files at that point
    sts2, sps2 = stages(model), specs(model, tmp_path / "b")
    first = drive(model, sts2, sps2, prompt, 3)
    fresh = stages(model)[1]
    with pytest.raises(StoreNotOpen):
        fresh.forward(sps2[1].directory, torch.zeros(1, 144), torch.tensor([93]), True, 0, 8)
    assert fresh.open(sps2[1], len(prompt) + 3) == len(prompt) + 3
    rest = drive(model, [sts2[0], fresh], sps2, prompt, 3, start_step=3, last=first[-1])
    for g, w in zip(first + rest, got, strict=True):
        assert torch.equal(g, w)
    names = [p.name for p in (tmp_path / "a" / "stage-1").iterdir()]
    _, mismatch, errors = filecmp.cmpfiles(tmp_path / "a" / "stage-1", tmp_path / "b" / "stage-1", names,
                                           shallow=False)
    assert "layer-001.rec" in names and not mismatch and not errors


def test_open_cuts_unconfirmed_calls_and_refuses_lost_or_damaged_records(model, prompt, tmp_path):
    sts, sps = stages(model), specs(model, tmp_path)
    drive(model, sts, sps, prompt, 2)
    n = len(prompt) + 2
    rec = tmp_path / "stage-0" / "layer-000.rec"
    size = rec.stat().st_size
    fresh = stages(model)[0]
    assert fresh.open(sps[0], n - 1) == n - 1  # the last step was never confirmed: cut from the files
    assert rec.stat().st_size == size * (n - 1) // n
    with pytest.raises(CorruptRecord, match=f"holds {n - 1} token.*confirmed {n}"):
        stages(model)[0].open(sps[0], n)
    fresh.close(sps[0].directory)
    data = bytearray(rec.read_bytes())
    data[-10] ^= 0xFF
    rec.write_bytes(bytes(data))
    with pytest.raises(CorruptRecord, match="fails its crc32 check"):
        stages(model)[0].open(sps[0], n - 1)
    other = dataclasses.replace(sps[0], retrieval=RETRIEVAL.replace(n_window=8))
    with pytest.raises(ValueError, match="another stage setup"):
        stages(model)[0].open(other, 0)
    with pytest.raises(ValueError, match=r"runs layers \(0, 1\), the session asks \(1, 2\)"):
        stages(model)[0].open(sps[1], 0)


def test_planner_splits_by_memory_and_refuses_with_the_numbers():
    cfg = kvloft.config.PRESETS["smollm2-135m"]
    assert split_even(30, 4) == [(0, 8), (8, 16), (16, 23), (23, 30)]
    cost = layer_cost(cfg, torch.float32)
    assert cost.kv_bytes_per_token == 2 * 3 * 64 * 4
    per_layer = cost.at(100_000)  # 0.143 GiB of KV + 0.013 GiB of weights per layer
    one_node = 20 * per_layer  # one node holds 20 of the 30 layers: two hold them all
    assert split_by_memory(30, cost, 100_000, (one_node, one_node)) == [(0, 15), (15, 30)]
    assert split_by_memory(30, cost, 100_000, (one_node, one_node // 2)) == [(0, 20), (20, 30)]
    with pytest.raises(ValueError, match=r"30 layers x 0\.156 GiB \(weights 0\.013 \+ KV of 100000 tokens 0\.143\) = 4\.69 GiB do not fit 1 stage\(s\) of 3\.12 GiB"):
        split_by_memory(30, cost, 100_000, (one_node,))
    with pytest.raises(ValueError, match="at least as many layers"):
        split_even(2, 3)
    with pytest.raises(ValueError, match="set max_tokens > 0"):
        PipelineConfig(directory="x", stage_memory=1 << 30)
    with pytest.raises(ValueError, match="n_stages must be an int >= 1"):
        PipelineConfig(directory="x", n_stages=0)
    with pytest.raises(ValueError, match="one int or a tuple of n_stages=2"):
        PipelineConfig(directory="x", max_tokens=10, stage_memory=(1, 2, 3))
