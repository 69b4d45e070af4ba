"""Shared by the cluster tests (importable in Ray workers: the tests put this directory on
their job's code search path)."""

import dataclasses
import json

import torch

import kvloft


def byte_tokenizer():
    """A byte-level tokenizer with ChatML specials: 258 ids, inside the tiny preset's 512."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers

    from kvloft.runtime.tokenizer import Tokenizer

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    hf = HFTokenizer(models.BPE(vocab=vocab, merges=[]))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    hf.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    return Tokenizer(hf, eos_ids=(hf.token_to_id("<|im_end|>"),))


def tiny_chat_model():
    """The tiny random-weight preset (fp32, CPU) with the byte tokenizer: chat-capable, fast."""
    model = kvloft.load_model("tiny", device="cpu", dtype="float32")
    return dataclasses.replace(model, tokenizer=byte_tokenizer())


def run(session, prompt, steps, on_step=None):
    """Prefill logits, then greedy decode: the logits of every step."""
    session.feed(prompt)
    logits = [session.last_logits.clone()]
    for i in range(steps):
        if on_step:
            on_step(i)
        logits.append(session.step(int(logits[-1].argmax())).clone())
    return logits


def assert_logits_close(got, want):
    """Sharded against single-process: the same rows, merged in another order (fp32 rounding)."""
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=2e-5, rtol=1e-5)


def streamed_content(text: str) -> str:
    """The answer in a chat completion's server-sent events (which must end with [DONE])."""
    events = [line[6:] for line in text.splitlines() if line.startswith("data: ")]
    assert events and events[-1] == "[DONE]", text[-300:]
    chunks = [json.loads(e) for e in events[:-1]]
    assert all("error" not in c for c in chunks), chunks
    return "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
