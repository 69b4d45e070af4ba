"""Task-level quality of retrieval methods: RULER-style samples run through real sessions.

    model = kvloft.load_model("smollm2")
    result = evaluate(model, ["passkey"], [2048], ["dense", "exact"], budget=256, samples=4, seed=0, chat=True)
    save(result, out=Path("quality_x.json"), doc=Path("quality_x.md"))

Each sample is run once per method: the prompt is prefilled once, densely, and that session
forked into each method (Session.fork; prefill="shared", the default), or fed to a fresh
Session per method (prefill="own"; also for a method the fork refuses, e.g. "+x", named in
its record): kvloft.eval.contexts. Then the answer is generated greedily until a newline,
EOS or the task's token limit, and scored as RULER scores it (kvloft.eval.scoring). Per (task, length, method) the
result holds the mean score, n, a 95% Wilson interval, mean prefill seconds, decode
ms/token and keys attended per decode step (per layer and KV head: the static tier plus
the rows the retriever picked; for dense, the whole context).

The command line is `kvloft eval` (kvloft/eval/cli.py); it writes into the current
directory or `--out DIR`, never into the package. A run's record and the per-cell summary
are in eval/records.py, method specs in eval/methods.py, the JSON and markdown of a result
in eval/results.py. kvloft.eval.report merges results files into one table and a plot.
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict
from typing import Any

import torch

from kvloft.config import METHODS, CacheConfig, RetrievalConfig, RuntimeConfig
from kvloft.eval.contexts import PREFILL_MODES, Context, own_context, shared_contexts
from kvloft.eval.methods import (
    EXTRAPOLATE_SUFFIX,
    budget_list,
    method_columns,
    method_unavailable,
    parse_method,
    retrieval_config,
)
from kvloft.eval.records import RunRecord, summarize, wilson_interval
from kvloft.eval.results import DOC_TITLE, from_runs, markdown, save, write_doc
from kvloft.eval.scoring import TASK_METRIC, score
from kvloft.eval.tasks import TASKS, Sample, build_prompt, run_task_samples
from kvloft.index.base import Selection

# with the names re-exported from records, methods and results (callers import them from here)
__all__ = [
    "DOC_TITLE",
    "EXTRAPOLATE_SUFFIX",
    "PREFILL_MODES",
    "RULER_MAX_NEW_TOKENS",
    "RunRecord",
    "decode_record",
    "evaluate",
    "from_runs",
    "machine_label",
    "markdown",
    "max_new_tokens_for",
    "method_unavailable",
    "parse_method",
    "retrieval_config",
    "run_prompt",
    "run_sample",
    "save",
    "summarize",
    "until_full_score",
    "wilson_interval",
    "write_doc",
]

# RULER's tokens_to_generate per task family; passkey answers in a handful of tokens.
RULER_MAX_NEW_TOKENS = {
    "passkey": 16, "niah_single_number": 128, "niah_single_word": 128, "niah_single_uuid": 128,
    "niah_multikey": 128, "niah_multivalue": 128, "niah_multiquery": 128, "vt": 30, "cwe": 120, "fwe": 50,
}
ANSWER_SLACK = 8  # tokens allowed beyond the references themselves (spaces, commas, a full stop)


def max_new_tokens_for(sample: Sample, tokenizer: Any) -> int:
    """Plain prompts: the answer's own tokens plus slack, at most RULER's limit for the task.
    Chat prompts: RULER's limit (an instruct model formats its answer as it likes, a list on
    several lines say, and ends its turn with EOS)."""
    if sample.chat is not None:
        return RULER_MAX_NEW_TOKENS.get(sample.task, 128)
    answer = " " + ", ".join(sample.references)
    need = len(tokenizer.encode(answer, add_bos=False)) + ANSWER_SLACK
    return min(RULER_MAX_NEW_TOKENS.get(sample.task, 128), need)


class _CountingRetriever:
    """Forwards to a session's retriever and counts the host rows each select() hands back."""

    def __init__(self, inner: Any, n_kv_heads: int) -> None:
        self.inner = inner
        self.n_kv_heads = n_kv_heads
        self.calls = 0
        # valid ids summed over calls, on the ids' device: read once at the end (a read per
        # call would stop the host at every layer of every step until the device caught up)
        self._shared: Any = 0
        self._per_head: Any = 0

    def build(self, layer, keys, queries) -> None:
        self.inner.build(layer, keys, queries)

    def add(self, layer, keys, positions) -> None:
        self.inner.add(layer, keys, positions)

    def select(self, layer, q, budget) -> Selection:
        sel = self.inner.select(layer, q, budget)
        valid = (sel.ids >= 0).sum()
        self.calls += 1
        if sel.shared:
            self._shared = self._shared + valid
        else:
            self._per_head = self._per_head + valid
        return sel

    @property
    def rows_per_head(self) -> float:
        """Selected rows per KV head, summed over the calls."""
        return float(self._shared) + float(self._per_head) / self.n_kv_heads

    def stats(self) -> dict[str, Any]:
        return self.inner.stats()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def until_full_score(pieces: Iterator[str], sample: Sample) -> str:
    """The text of `pieces` (a Session.stream), cut at the first piece after which it scores 1.0
    for `sample`; the stream is closed there (the session keeps the tokens decoded so far).

    RULER's metrics are substring matches (kvloft.eval.scoring), so a reference found in a prefix
    is found in every longer output: the cut output scores what the whole generation would."""
    text = ""
    for piece in pieces:
        text += piece
        if score(sample.task, text, sample.references) == 1.0:
            pieces.close()
            break
    return text


def run_sample(model, sample: Sample, index: int, rcfg: RetrievalConfig, runtime: RuntimeConfig,
               max_new_tokens: int, label: str | None = None, cache: CacheConfig | None = None) -> RunRecord:
    """Feed the sample's prompt in a fresh session, generate greedily (to a newline for plain
    prompts, to EOS for chat prompts), score.

    label: the method's name in the results (default rcfg.method; "exact+x" for extrapolation).
    cache: the session's tier settings (e.g. an 8-bit host tier); default CacheConfig().
    """
    ctx = own_context(model, build_prompt(sample), rcfg, runtime, cache)
    return decode_record(ctx, sample, index, rcfg, max_new_tokens, label)


def decode_record(ctx: Context, sample: Sample, index: int, rcfg: RetrievalConfig, max_new_tokens: int,
                  label: str | None = None, until_scored: bool = True) -> RunRecord:
    """Generate greedily from a session holding the sample's prompt (ctx.session, of config
    rcfg; decoding changes it), score, and say how its prefill was had (ctx).

    until_scored: stop as soon as the output holds every reference (until_full_score): the
    score is the one the whole generation would get, for far fewer decode steps."""
    s = ctx.session
    counter = None
    if rcfg.method != "dense":
        counter = _CountingRetriever(s.backend.retriever, s.model.config.n_kv_heads)
        s.backend.retriever = counter  # count what each decode step attends to
    # plain prompts stop at the end of the line; chat answers at EOS (the end of the turn)
    pieces = s.stream(max_new_tokens=max_new_tokens, stop=None if sample.chat is not None else ["\n"])
    output = until_full_score(pieces, sample) if until_scored else "".join(pieces)
    st = s.stats()
    steps = st["timings_s"]["decode_tokens"]
    keys = scanned = None
    if steps and counter is None:
        keys = ctx.prompt_tokens + (steps + 1) / 2  # mean context over the steps
    elif steps and counter is not None:
        calls = max(counter.calls, 1)
        keys = st["tier_tokens"]["static"] + counter.rows_per_head / calls
        scanned = st["keys_scanned"] / calls
    return RunRecord(
        task=sample.task, length=sample.target_tokens, index=index, seed=sample.seed, depth=sample.depth,
        method=label or rcfg.method, prompt_tokens=ctx.prompt_tokens, output=output,
        references=list(sample.references), score=score(sample.task, output, sample.references),
        prefill_s=ctx.prefill_s, decode_tokens=steps, decode_ms_per_tok=st.get("decode_ms_per_tok"),
        keys_per_step=keys, scanned_per_step=scanned, budget=None if rcfg.method == "dense" else rcfg.budget,
        prefill=ctx.prefill, fork_s=ctx.fork_s, prefill_note=ctx.note,
    )


def run_prompt(model, sample: Sample, index: int, methods: Sequence[tuple[str, RetrievalConfig]],
               runtime: RuntimeConfig, max_new_tokens: int, cache: CacheConfig | None = None,
               prefill: str = "shared", dense: RetrievalConfig | None = None,
               until_scored: bool = True) -> Iterator[RunRecord]:
    """The sample under every (label, config) of `methods`, records in that order.

    prefill "own": each method prefills the prompt in a fresh session (run_sample). "shared":
    one dense prefill (config `dense`, default RetrievalConfig(method="dense")) forked into each
    method (kvloft.eval.contexts; a method the fork refuses prefills on its own, its record says
    why). Either way each record is yielded as its run completes.
    """
    prompt = build_prompt(sample)
    if prefill == "own":
        for label, rcfg in methods:
            yield decode_record(own_context(model, prompt, rcfg, runtime, cache), sample, index, rcfg,
                                max_new_tokens, label, until_scored)
        return
    rcfgs = [rcfg for _, rcfg in methods]
    for i, ctx in shared_contexts(model, prompt, rcfgs, dense or RetrievalConfig(method="dense"), runtime, cache):
        rec = decode_record(ctx, sample, index, rcfgs[i], max_new_tokens, methods[i][0], until_scored)
        del ctx  # the next context may need the memory (a fork is never kept)
        yield rec


def _check_args(model, tasks, lengths, methods, budget, samples) -> None:
    if getattr(model, "tokenizer", None) is None:
        raise ValueError("evaluate needs a model with a tokenizer (e.g. load_model('smollm2')), "
                         "not a random-weight preset")
    unknown = [t for t in tasks if t not in TASKS or t not in TASK_METRIC]
    if unknown or not tasks:
        raise ValueError(f"tasks must be a non-empty list of {', '.join(TASKS)}; got {list(tasks)}")
    if not lengths or any(not isinstance(n, int) or n <= 0 for n in lengths):
        raise ValueError(f"lengths must be positive token counts (e.g. [2048, 4096]); got {list(lengths)}")
    bad = [m for m in methods if parse_method(m)[0] not in METHODS]
    if bad or not methods:
        raise ValueError(f"methods must be a non-empty list of {', '.join(METHODS)}; got {list(methods)}")
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise ValueError(f"samples must be an int >= 1, got {samples!r}")
    budgets = budget_list(budget)
    if not budgets or any(isinstance(b, bool) or not isinstance(b, int) or b < 0 for b in budgets):
        raise ValueError(f"budget must be an int >= 0 host tokens per step (or a list of them), got {budget!r}")
    if len(set(budgets)) != len(budgets):
        raise ValueError(f"budgets must differ, got {budget!r}")


def machine_label() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    label = f"{cpu}, {os.cpu_count()} cores, torch {torch.get_num_threads()} threads"
    if torch.cuda.is_available():
        label += f"; {torch.cuda.get_device_name()}"
    return label


def evaluate(
    model,
    tasks: Sequence[str],
    lengths: Sequence[int],
    methods: Sequence[str],
    budget: int,
    samples: int,
    seed: int = 0,
    n_sink: int = 64,
    n_window: int = 512,
    max_new_tokens: int | None = None,
    progress: bool = True,
    runtime: RuntimeConfig | None = None,
    on_record: Callable[[dict[str, Any]], None] | None = None,
    max_similar: int | None = None,
    chat: bool = False,
    cache: CacheConfig | None = None,
    variant: str = "",
    prefill: str = "shared",
    until_scored: bool = True,
) -> dict[str, Any]:
    """Run every sample once per method; returns {"meta", "skipped", "cells", "runs"}.

    chat: render each prompt in the model's own chat template (kvloft.eval.tasks.generate);
    the same samples for every method either way (seeded).

    on_record: called with {"meta", "skipped"} before the first run and with each run's
    record (a dict) as it completes, so a long evaluation that is stopped keeps what it
    did (`kvloft eval` appends them to a .runs.jsonl file; `--from-runs` rebuilds the tables).

    max_new_tokens: None = per sample, the answer's tokens plus slack, at most RULER's
    limit for the task (see max_new_tokens_for). Methods whose retriever module is missing
    are skipped and listed under "skipped" with the reason. max_similar: None = the position
    mode's default (RetrievalConfig; the cap is on for "+x" methods, off otherwise).
    cache: every session's tier settings (CacheConfig(host_dtype="fp8") for an 8-bit host
    tier). variant: appended to every method's label ("exact[int4,fp8]"), so runs of the same
    method with other weights or tiers stay apart when runs files are merged.
    prefill: "shared" (default) prefills each prompt once, densely, and forks that session into
    each method (kvloft.eval.contexts; a method the fork refuses prefills on its own and its
    record says why: "prefill": "own", "prefill_note"). "own": a prefill per method and prompt.
    until_scored: end each generation once it holds every reference (until_full_score; the
    scores are unchanged, the outputs are cut there); False generates to EOS or the limit.
    """
    tasks, lengths, methods = list(tasks), list(lengths), list(methods)
    _check_args(model, tasks, lengths, methods, budget, samples)
    if prefill not in PREFILL_MODES:
        raise ValueError(f"prefill must be one of {', '.join(PREFILL_MODES)}; got {prefill!r}")
    budgets = budget_list(budget)
    for m in methods:  # configs are checked before any slow work
        if m != "dense":
            for b in budgets:
                retrieval_config(m, b, n_sink, n_window, max_similar)
    runtime = runtime or RuntimeConfig(progress=False)
    skipped = {m: why for m in methods if (why := method_unavailable(m))}
    active = [m for m in methods if m not in skipped]
    meta = _meta(model, tasks, lengths, methods, budget, samples, seed, n_sink, n_window, max_new_tokens, runtime)
    meta["max_similar"] = max_similar
    meta["chat"] = chat
    meta["variant"] = variant
    meta["host_dtype"] = (cache or CacheConfig()).host_dtype
    meta["prefill"] = prefill
    meta["until_scored"] = until_scored
    if on_record is not None:
        on_record({"meta": meta, "skipped": skipped})
    dense = retrieval_config("dense", budgets[0], n_sink, n_window, max_similar)  # the dense method's own config
    labels = iter(method_columns(active, budget, variant))
    specs = [(next(labels), retrieval_config(m, b, n_sink, n_window, max_similar))
             for m in active for b in (budgets[:1] if m == "dense" or len(budgets) == 1 else budgets)]
    drawn = {t: run_task_samples(t, model.tokenizer, lengths, samples, seed, chat=chat) for t in tasks}
    bar = _progress_bar(sum(len(v) for v in drawn.values()) * len(specs), progress)
    records: list[RunRecord] = []
    for task_samples in drawn.values():
        for i, sample in enumerate(task_samples):
            limit = max_new_tokens or max_new_tokens_for(sample, model.tokenizer)
            for rec in run_prompt(model, sample, i % samples, specs, runtime, limit, cache, prefill, dense,
                                  until_scored):
                records.append(rec)
                _advance(bar, records[-1])
                if on_record is not None:
                    on_record(asdict(records[-1]))
    if bar is not None:
        bar.close()
    return {"meta": meta, "skipped": skipped, "cells": summarize(records),
            "runs": [asdict(r) for r in records]}


def _progress_bar(total: int, enabled: bool):
    if not enabled or total == 0:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="run", desc="eval")


def _advance(bar, rec: RunRecord) -> None:
    if bar is None:
        return
    bar.set_postfix_str(f"{rec.task}@{rec.length} {rec.method}: {rec.score:.0%}")
    bar.update(1)


def _meta(model, tasks, lengths, methods, budget, samples, seed, n_sink, n_window, max_new_tokens,
          runtime: RuntimeConfig) -> dict[str, Any]:
    return {
        "model": model.source, "model_name": model.config.name, "dtype": str(model.dtype).replace("torch.", ""),
        "device": str(model.device), "kernels": runtime.kernels, "prefill_chunk": runtime.resolved_prefill_chunk(model.device),
        "machine": machine_label(), "date": _dt.datetime.now().isoformat(timespec="seconds"),
        "torch": torch.__version__, "tasks": tasks, "lengths": lengths, "methods": methods,
        "budget": budget, "samples": samples, "seed": seed, "n_sink": n_sink, "n_window": n_window,
        "max_new_tokens": max_new_tokens or "per task (plain: answer tokens + 8, at most RULER's; chat: RULER's)",
    }
