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
