"""Long-context sessions: feed a context once, then generate from it.

    model = kvloft.load_model("smollm2")
    s = kvloft.Session(model, kvloft.RetrievalConfig(method="exact", budget=256))
    s.feed(long_text)                          # chunked prefill, progress bar
    print(s.generate(max_new_tokens=32))       # or: for piece in s.stream(...)

A session owns its KV tiers and retriever. Inputs are validated before anything is
changed, so a rejected call leaves the session as it was and usable.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor

from kvloft.config import CacheConfig, RetrievalConfig, RuntimeConfig
from kvloft.index.base import make_retriever
from kvloft.kernels import kernel_set
from kvloft.runtime.attention import TieredAttention
from kvloft.runtime.capacity import SessionLimits
from kvloft.runtime.dense import DenseAttention
from kvloft.runtime.fork import fork_session
from kvloft.runtime.graphs import DecodeGraphs
from kvloft.runtime.inputs import check_on_progress, check_token_ids
from kvloft.runtime.loader import Model
from kvloft.runtime.numerics import NonFiniteError, finite_sum
from kvloft.runtime.persist import read_save, restore_session, save_session
from kvloft.runtime.quant_linear import apply_weights
from kvloft.runtime.sampling import check_generate_args, sample_token
from kvloft.tiers.kvcache import TieredKVCache


class Session:
    def __init__(
        self,
        model: Model,
        retrieval: RetrievalConfig | None = None,
        runtime: RuntimeConfig | None = None,
        cache: CacheConfig | None = None,
    ) -> None:
        if not isinstance(model, Model):
            raise TypeError(f"Session needs a model from kvloft.load_model(...), got {type(model).__name__}")
        self.model = model
        self.retrieval = retrieval or RetrievalConfig()
        self.runtime = runtime or RuntimeConfig()
        self.cache_cfg = cache or CacheConfig()
        for name, obj, cls in (("retrieval", self.retrieval, RetrievalConfig),
                               ("runtime", self.runtime, RuntimeConfig), ("cache", self.cache_cfg, CacheConfig)):
            if not isinstance(obj, cls):
                raise TypeError(f"{name} must be a kvloft.{cls.__name__}, got {type(obj).__name__}")
        self.ops = kernel_set(self.runtime.kernels, model.device)
        apply_weights(model.net, model.weights, self.runtime)
        self.limits = SessionLimits(model, self.retrieval, self.runtime, self.cache_cfg, self.ops)
        self.limits.check_static_memory()
        self.limits.check_disk_tier()
        self._graphs: DecodeGraphs | None = None  # captured at the first CUDA decode step
        self._calls = 0  # calls under way (_atomic): a stream() not finished holds one
        self.reset()

    # ---- state ---------------------------------------------------------------------------

    def reset(self) -> None:
        """Forget the context (keeps model and configs); spilled chunks' files are removed."""
        cfg, m = self.model.config, self.model
        old = getattr(self, "backend", None)
        if isinstance(old, TieredAttention):
            old.cache.close()
        if self.retrieval.method == "dense":
            self.backend = DenseAttention(cfg, self.ops, m.device, m.dtype, self.runtime.profile)
        else:
            kv = TieredKVCache(cfg, n_sink=self.retrieval.n_sink, n_window=self.retrieval.n_window,
                               host_chunk=self.cache_cfg.host_chunk_tokens, device=m.device, dtype=m.dtype,
                               disk_dir=self.cache_cfg.disk_dir, host_budget=self.runtime.host_memory_budget,
                               evict_batch=self.cache_cfg.resolved_evict_batch(m.device),
                               host_dtype=self.cache_cfg.host_dtype)
            retriever = make_retriever(self.retrieval, cfg, m.device)
            if self.runtime.scheduler == "overlap":
                from kvloft.runtime.scheduled import ScheduledAttention

                self.backend = ScheduledAttention(cfg, self.retrieval, kv, retriever, self.ops, m.device,
                                                  self.runtime.profile, runtime=self.runtime,
                                                  cache_cfg=self.cache_cfg)
            else:
                self.backend = TieredAttention(cfg, self.retrieval, kv, retriever, self.ops, m.device,
                                               self.runtime.profile)
        self.tokens: list[int] = []
        self.prefill_chunk: int | None = None  # tokens per chunk of the last feed (on CUDA: the plan's choice)
        self._last_logits: Tensor | None = None
        self._times = {"prefill_s": 0.0, "prefill_tokens": 0, "decode_s": 0.0, "decode_tokens": 0}

    def __len__(self) -> int:
        return len(self.tokens)

    def state_dict(self) -> dict[str, Any]:
        """The session's own state besides its tiers and retriever: tokens (list of int),
        last_logits ([V] fp32 or None) and timings (a copy; for kvloft.runtime.persist)."""
        return {"tokens": list(self.tokens), "last_logits": self._last_logits, "times": dict(self._times)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore state_dict() over tiers that already hold those tokens (ValueError if not)."""
        tokens = [int(t) for t in state["tokens"]]
        if self.backend.n_tokens != len(tokens):
            raise ValueError(f"the tiers hold {self.backend.n_tokens} tokens, the token list {len(tokens)}")
        logits = state["last_logits"]
        if logits is not None and tuple(logits.shape) != (self.model.config.vocab_size,):
            raise ValueError(f"last_logits must be [{self.model.config.vocab_size}], got {tuple(logits.shape)}")
        self.tokens, self._last_logits = tokens, logits
        self._times.update(state["times"])

    # ---- input ---------------------------------------------------------------------------

    def _to_ids(self, prompt: str | Sequence[int] | Tensor) -> list[int]:
        if isinstance(prompt, str):
            if self.model.tokenizer is None:
                raise ValueError(
                    f"model {self.model.source} has no tokenizer (random-weight preset); feed token ids"
                )
            ids = self.model.tokenizer.encode(prompt, add_bos=not self.tokens and None)
        else:
            ids = check_token_ids(prompt)
        if not ids:
            raise ValueError("the prompt is empty; feed some text or at least one token id")
        bad = [t for t in ids if not 0 <= t < self.model.config.vocab_size]
        if bad:
            raise ValueError(f"token ids must lie in [0, {self.model.config.vocab_size}); got {bad[:5]}")
        return ids

    def _check_capacity(self, n_new: int) -> None:
        """n_new more tokens fit every limit (runtime/capacity.py); ValueError naming the fix if not."""
        self.limits.check_capacity(self.backend, len(self.tokens), n_new)

    # ---- prefill -------------------------------------------------------------------------

    def feed(self, prompt: str | Sequence[int] | Tensor,
             on_progress: Callable[[int, int], None] | None = None) -> int:
        """Append text or token ids to the context (chunked prefill). Returns tokens fed.

        on_progress(done, total) is called after each prefill chunk (e.g. to stream progress).
        """
        ids = self._to_ids(prompt)
        check_on_progress(on_progress)
        self._check_capacity(len(ids))
        t0 = time.perf_counter()
        with self._atomic():
            self._prefill(ids, on_progress)
        self._times["prefill_s"] += time.perf_counter() - t0
        self._times["prefill_tokens"] += len(ids)
        return len(ids)

    def feed_chat(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> int:
        """Feed chat messages rendered with the model's chat template."""
        if self.model.tokenizer is None:
            raise ValueError("this model has no tokenizer, so it has no chat template; feed token ids")
        text = self.model.tokenizer.apply_chat_template(messages, add_generation_prompt)
        return self.feed(text)

    def _prefill(self, ids: list[int], on_progress: Callable[[int, int], None] | None = None) -> None:
        chunk = self.limits.prefill_chunk(self.backend, len(self.tokens), len(ids))
        self.prefill_chunk = chunk
        start = len(self.tokens)
        n_chunks = -(-len(ids) // chunk)
        bar = None
        if self.runtime.progress and n_chunks > 4:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(ids), unit="tok", desc="prefill", leave=False)
        if isinstance(self.backend, TieredAttention):
            self.backend.decoding = False
        watch = self.backend.finite
        watch.on = True  # keys and values appended by a chunk, read once with its logits
        try:
            for i in range(0, len(ids), chunk):
                part = ids[i : i + chunk]
                self._prefill_chunk(part, start + i, feed_after=len(ids) - i - len(part))
                self.tokens.extend(part)
                if bar is not None:
                    bar.update(len(part))
                if on_progress is not None:
                    on_progress(i + len(part), len(ids))
        finally:
            watch.on = False
            watch.take()
            if bar is not None:
                bar.close()
        if isinstance(self.backend, TieredAttention):
            self.backend.build_indexes()

    def _prefill_chunk(self, part: list[int], start: int, feed_after: int) -> None:
        """One chunk at positions start..; NonFiniteError if its keys, values or logits are not
        finite (one host sync: the backend's flag and the logits read together)."""
        if isinstance(self.backend, TieredAttention):
            self.backend.feed_after = feed_after  # the feed's tail selects for itself
        watch, where = self.backend.finite, f"prefill of tokens {start}..{start + len(part) - 1}"
        try:
            self._forward(part, start, last_only=True)
        except Exception as e:  # e.g. a retriever refusing NaN keys: name the cause
            if watch.take():
                raise NonFiniteError(self._nonfinite_message(where)) from e
            raise
        watch.see(self._last_logits)
        if watch.take():
            raise NonFiniteError(self._nonfinite_message(where))

    def _forward(self, ids: list[int], start: int, last_only: bool) -> None:
        dev = self.model.device
        x = torch.tensor(ids, dtype=torch.long, device=dev)
        pos = torch.arange(start, start + len(ids), device=dev)
        if len(ids) == 1 and dev.type == "cuda" and self.runtime.cuda_graphs and not self.backend.finite.on:
            if self._graphs is None:
                self._graphs = DecodeGraphs(self.model.net)
            logits = self._graphs.step(x, pos, self.backend)
        else:
            logits = self.model.net(x, pos, self.backend, last_only=last_only)
        self._last_logits = logits[-1].clone()

    # ---- decode --------------------------------------------------------------------------

    def step(self, token_id: int) -> Tensor:
        """Append one token through the decode path; returns the next token's logits [V] fp32."""
        ids = self._to_ids([token_id])
        self._check_capacity(1)
        if self._last_logits is None:
            raise ValueError("step() continues a context: feed a prompt first")
        with self._atomic():
            self._decode_one(ids[0])
            self._check_last_logits()
        return self._last_logits

    def _decode_one(self, token: int) -> None:
        if isinstance(self.backend, TieredAttention):
            self.backend.decoding = True
        t0 = time.perf_counter()
        self._forward([token], len(self.tokens), last_only=True)
        self._times["decode_s"] += time.perf_counter() - t0
        self._times["decode_tokens"] += 1
        self.tokens.append(token)

    # ---- failures: non-finite numbers, rollback ----------------------------------------------

    def _nonfinite_message(self, where: str) -> str:
        return (f"non-finite numbers (NaN or inf) in the keys, values or logits of the {where}: the model's "
                f"weights hold NaN/inf, the KV tiers were corrupted, or {str(self.model.dtype)[6:]} overflowed "
                "(float16: try bfloat16). The call was rolled back: the session is as it was before it")

    def _check_last_logits(self) -> None:
        """After a decode step: one host sync (generate checks the copy it samples from instead)."""
        if not bool(torch.isfinite(finite_sum(self._last_logits))):
            raise NonFiniteError(self._nonfinite_message(f"decode step of token {len(self.tokens) - 1}"))

    def _mark(self) -> dict[str, Any]:
        return {"backend": self.backend.mark(), "n_tokens": len(self.tokens), "last_logits": self._last_logits,
                "times": dict(self._times)}

    def _rollback(self, mark: dict[str, Any]) -> None:
        self.backend.rollback(mark["backend"])
        del self.tokens[mark["n_tokens"]:]
        self._last_logits, self._times = mark["last_logits"], mark["times"]

    @contextmanager
    def _atomic(self) -> Iterator[None]:
        """A call that raises (a non-finite step, an interrupt, any error) leaves the session as
        it was before the call: tokens, tiers, retriever state (Session._rollback)."""
        mark = self._mark()
        self._calls += 1
        try:
            yield
        except (Exception, KeyboardInterrupt) as e:
            try:
                self._rollback(mark)
            except Exception as e2:  # noqa: BLE001 -- the original error stays the one raised
                e.add_note(f"the session could not be rolled back ({type(e2).__name__}: {e2}); call reset()")
            raise
        finally:
            self._calls -= 1

    in_call = property(lambda self: self._calls > 0, doc="a call is under way (a stream() not finished)")

    def stream(
        self,
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        top_p: float = 1.0,
        stop: Sequence[str] | str | None = None,
        seed: int | None = None,
    ) -> Iterator[str]:
        """Generate, yielding text pieces as they form. Stops at EOS, a stop string or the limit.

        The arguments are checked here, before the first piece is asked for."""
        stops = self._check_generate_args(max_new_tokens, temperature, top_p, stop, seed)
        return self._stream(max_new_tokens, temperature, top_p, stops, seed)

    def _stream(self, max_new_tokens: int, temperature: float, top_p: float, stops: list[str],
                seed: int | None) -> Iterator[str]:
        with self._atomic():  # a failure rolls back every token of this call
            yield from self._pieces(max_new_tokens, temperature, top_p, stops, seed)
            self._check_last_logits()

    def _pieces(self, max_new_tokens: int, temperature: float, top_p: float, stops: list[str],
                seed: int | None) -> Iterator[str]:
        tok = self.model.tokenizer
        eos = set(tok.eos_ids if tok else self.model.config.eos_token_ids)
        gen = torch.Generator().manual_seed(self.runtime.seed if seed is None else seed)
        new: list[int] = []
        text_so_far = ""
        for _ in range(max_new_tokens):
            nxt = self._sample(temperature, top_p, gen)
            if nxt in eos:
                break
            self._check_capacity(1)
            self._decode_one(nxt)
            new.append(nxt)
            if tok is None:
                continue
            text = tok.decode(new)
            if text.endswith("\ufffd"):  # an incomplete multi-byte character: wait
                continue
            hit = next((s for s in stops if s in text), None)
            if hit is not None:
                piece = text[: text.index(hit)][len(text_so_far):]
                if piece:
                    yield piece
                return
            piece, text_so_far = text[len(text_so_far):], text
            if piece:
                yield piece

    def generate(self, max_new_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0,
                 stop: Sequence[str] | str | None = None, seed: int | None = None) -> str:
        """Generate and return the text (see stream)."""
        return "".join(self.stream(max_new_tokens, temperature, top_p, stop, seed))

    def _check_generate_args(self, max_new_tokens: int, temperature: float, top_p: float,
                             stop: Sequence[str] | str | None, seed: int | None) -> list[str]:
        return check_generate_args(max_new_tokens, temperature, top_p, stop, seed, self._last_logits)

    def _sample(self, temperature: float, top_p: float, gen: torch.Generator) -> int:
        logits = self._last_logits.float().cpu()  # the step's one host sync
        if not bool(torch.isfinite(finite_sum(logits))):
            raise NonFiniteError(self._nonfinite_message(f"decode step of token {len(self.tokens) - 1}"))
        return sample_token(logits, temperature, top_p, gen)

    @property
    def last_logits(self) -> Tensor | None:
        """Logits [V] fp32 of the next token after the context."""
        return self._last_logits

    # ---- reports -------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        b = self.backend
        out: dict[str, Any] = {
            "method": self.retrieval.method,
            "tokens": len(self.tokens),
            "bytes": b.bytes(),
            "timings_s": {**self._times, **b.timers.as_dict()},
            "kernels": self.ops.name,
            "weights": self.model.weights,
            "weight_bytes": self.model.weight_bytes,  # packed bytes for int4/int8 linears
        }
        tok = self.model.tokenizer
        if tok is not None:  # "model": the model's own template; "builtin-*": it carries none
            out["chat_template"] = tok.chat_template_source
        t = self._times
        if t["prefill_s"]:
            out["prefill_tok_per_s"] = round(t["prefill_tokens"] / t["prefill_s"], 1)
        if t["decode_s"]:
            out["decode_ms_per_tok"] = round(1000 * t["decode_s"] / t["decode_tokens"], 2)
        if isinstance(b, TieredAttention):
            tiers = b.cache[0]
            spilled = min(tiers.host_k.n_spilled * tiers.host_k.chunk_rows, tiers.n_host)
            out["tier_tokens"] = {"static": tiers.n_static, "host": tiers.n_host - spilled, "disk": spilled}
            out["keys_scanned"] = b.scanned
            out["retriever"] = b.retriever.stats()
        return out

    # ---- fork and persistence ------------------------------------------------------------

    def fork(self, retrieval: RetrievalConfig | None = None) -> Session:
        """A new session holding this context, sharing nothing mutable: None = a copy; another config
        is built from this one's K/V where both prefills agree (kvloft.runtime.fork). ValueError if not."""
        return fork_session(self, self.retrieval if retrieval is None else retrieval)

    def save(self, path) -> None:
        """Write this session to the directory `path`, crash-safe (see kvloft.runtime.persist)."""
        save_session(self, path)

    @classmethod
    def load(cls, path, model: Model, runtime: RuntimeConfig | None = None) -> Session:
        """A session saved with save(), for the same model; ValueError if the save is corrupted or
        mismatched (see kvloft.runtime.persist)."""
        saved = read_save(path, model)
        session = cls(model, saved.retrieval, runtime or saved.runtime, saved.cache)
        restore_session(session, saved)
        return session
