"""kvloft generate with packed weights and an 8-bit host tier: the options reach the model and the tiers."""

import json

from kvloft import cli


def _generate(gguf, capsys, *extra: str) -> tuple[str, dict]:
    prompt = "Remember this. " * 20 + "The capital of France is"
    argv = ["generate", "--model", str(gguf), "--device", "cpu", "--prompt", prompt, "--max-new-tokens", "3",
            "--method", "exact", "--budget", "8", "--sink", "4", "--window", "4", "--stats", *extra]
    assert cli.main(argv) == 0
    out, err = capsys.readouterr()
    return out, json.loads(err[err.index("{"):])


def test_generate_with_int4_weights_and_int8_host_rows(smollm2_gguf, capsys):
    out, stats = _generate(smollm2_gguf, capsys, "--weights", "int4", "--host-dtype", "int8")
    _, plain = _generate(smollm2_gguf, capsys)
    assert "Paris" in out and stats["weights"] == "int4"
    assert stats["weight_bytes"] < 0.5 * plain["weight_bytes"]
    assert stats["tier_tokens"]["host"] == plain["tier_tokens"]["host"] > 0
    # fp32 rows: 2 x 3 heads x 64 x 4 bytes + 8; int8: 2 x 3 x (64 + 4) + 8 (codes, fp32 scales)
    assert stats["bytes"]["host"] / plain["bytes"]["host"] == (2 * 3 * 68 + 8) / (2 * 3 * 64 * 4 + 8)


def test_bad_weights_choice_is_refused():
    import pytest

    with pytest.raises(SystemExit):
        cli.main(["generate", "--model", "smollm2", "--prompt", "x", "--weights", "int3"])


def test_demo_contexts_fork_from_the_first_prefill_where_the_prefills_agree():
    """kvloft demo's sessions: the exact one forked from the dense prefill (same tokens, same next
    logits as its own prefill); past prefill_dense_tokens it prefills on its own instead."""
    import torch

    from kvloft import CacheConfig, RetrievalConfig, RuntimeConfig, Session, load_model

    model = load_model("tiny", device="cpu", dtype="float32", seed=3)
    ids = torch.randint(0, model.config.vocab_size, (150,), generator=torch.Generator().manual_seed(2)).tolist()
    runtime, cache = RuntimeConfig(progress=False), CacheConfig()
    exact = RetrievalConfig(method="exact", budget=16, n_sink=4, n_window=32)
    (dense, how0), (forked, how1) = cli._contexts(model, ids, [RetrievalConfig(method="dense"), exact], runtime, cache)
    assert how0["shared"] and "fork_s" in how1 and "prefill_s" not in how1
    alone = Session(model, exact, runtime, cache)
    alone.feed(ids)
    assert forked.tokens == dense.tokens == ids and forked.retrieval == exact
    torch.testing.assert_close(forked.last_logits, alone.last_logits, rtol=0, atol=1e-5)
    sparse = RetrievalConfig(method="exact", budget=16, n_sink=4, n_window=32, prefill_dense_tokens=64)
    _, (own, how) = cli._contexts(model, ids, [RetrievalConfig(method="dense"), sparse], runtime, cache)
    assert "fork_s" not in how and how["prefill_s"] > 0 and own.tokens == ids
