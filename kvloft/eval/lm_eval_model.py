"""`kvloft` as a model of lm-evaluation-harness (`pip install kvloft[eval]`).

    python -m kvloft.eval.lm_eval_model --model kvloft \\
        --model_args model=qwen2.5-0.5b,method=hip,budget=2048 --tasks TASKS ...

Every argument after the module is lm-eval's own command line (`lm_eval --help`). lm-eval
(0.4.x) looks models up in its registry and discovers no external packages by itself
(no entry points), so the model must be registered before its CLI runs: importing this
module does that (`@register_model("kvloft")`) and running it as a module then hands the
command line to lm-eval. From Python:

    import lm_eval
    import kvloft.eval.lm_eval_model  # registers "kvloft"
    lm_eval.simple_evaluate(model="kvloft", model_args="model=smollm2,method=exact,budget=1024", tasks=[...])

model_args: model (a name of kvloft.load_model, a GGUF file or a HF directory), method
(kvloft.config.METHODS), budget, sink, window, position_mode (exact | extrapolate),
device, dtype, kernels, max_length (default: the model's trained context), max_gen_toks
(default 256), tokenizer (read by lm-eval's RULER tasks only: an HF tokenizer name or a
directory, e.g. one written by `export_tokenizer`).

Each request runs in a fresh Session with the retrieval method, as a user's would:
  loglikelihood          feed the context (chunked prefill), then step through the
                         continuation, summing log-softmax of each next token (decode path,
                         so the method's sparse attention scores it); greedy = every
                         continuation token is the argmax.
  loglikelihood_rolling  lm-eval's rolling windows of max_length tokens, each scored as above.
  generate_until         feed the context, generate (greedy unless do_sample) until an
                         `until` string, EOS or max_gen_toks; the text before the stop string.
Requests are run one at a time (batch_size is accepted and ignored); one-token options of a
multiple-choice document share one prefill of its context.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window, simple_parse_args_string
from tqdm.auto import tqdm

from kvloft.config import METHODS, RetrievalConfig, RuntimeConfig
from kvloft.runtime.loader import Model, load_model
from kvloft.runtime.session import Session

__all__ = ["KvloftLM", "export_tokenizer", "main"]

logger = logging.getLogger(__name__)


@register_model("kvloft")
class KvloftLM(TemplateLM):
    """lm-eval's view of kvloft: one Session per request, with the given retrieval method."""

    def __init__(
        self,
        model: str | Model = "smollm2",
        method: str = "dense",
        budget: int = 2048,
        sink: int = 64,
        window: int = 512,
        position_mode: str = "exact",
        device: str | None = "auto",
        dtype: str = "auto",
        kernels: str | None = None,
        max_length: int | None = None,
        max_gen_toks: int = 256,
        tokenizer: str | None = None,  # for lm-eval's RULER tasks, which size their prompts with it
        batch_size: int | str | None = 1,
        max_batch_size: int | None = None,
    ) -> None:
        super().__init__()
        if method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}; got {method!r}")
        device = device or "auto"
        self.model = model if isinstance(model, Model) else load_model(str(model), device=device, dtype=dtype)
        if self.model.tokenizer is None:
            raise ValueError(f"model {self.model.source} has no tokenizer (a random-weight preset); lm-eval "
                             "passes text: use a real model (smollm2, a GGUF file or a HF directory)")
        self.tokenizer = self.model.tokenizer
        self.retrieval = RetrievalConfig(method=method, budget=int(budget), n_sink=int(sink), n_window=int(window),
                                         position_mode=position_mode)
        kw: dict[str, Any] = {"progress": False, "device": device}
        if kernels:
            kw["kernels"] = kernels
        self.runtime = RuntimeConfig(**kw)
        self.max_length = int(max_length or self.model.config.max_position_embeddings)
        self.max_gen_toks = int(max_gen_toks)
        if self.max_gen_toks < 1 or self.max_length <= self.max_gen_toks:
            raise ValueError(f"need 1 <= max_gen_toks < max_length; got {self.max_gen_toks}, {self.max_length}")
        self._device = self.model.device
        self._last_context: list[int] | None = None  # the last prefilled context and its next-token logits [V]
        self._last_logits: torch.Tensor | None = None

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> KvloftLM:
        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict[str, Any], additional_config: dict | None = None) -> KvloftLM:
        """model_args win over the harness's own settings: lm-eval passes device="cuda:0" unless
        told otherwise, so that device is taken only where CUDA exists and model_args name none."""
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None}
        device = extra.get("device")
        if device is not None and str(device).startswith("cuda") and not torch.cuda.is_available():
            logger.warning("lm-eval asked for device %s, which this machine lacks; kvloft picks one", device)
            extra.pop("device")
        return cls(**{**extra, **arg_dict})

    # ---- tokens ----------------------------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_ids[0]

    @property
    def prefix_token_id(self) -> int:
        """What an empty context is conditioned on: BOS, else the end-of-text token."""
        bos = self.tokenizer.bos_id
        return bos if bos is not None else self.eot_token_id

    @property
    def tokenizer_name(self) -> str:
        return self.model.source

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        return self.tokenizer.encode(string, add_bos=add_special_tokens)

    def tok_decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens)

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return self.tokenizer.chat_template if chat_template else None

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(chat_history, add_generation_prompt)

    def get_model_info(self) -> dict[str, Any]:
        r = self.retrieval
        return {"kvloft_model": self.model.source, "kvloft_method": r.method, "kvloft_budget": r.budget,
                "kvloft_sink": r.n_sink, "kvloft_window": r.n_window, "kvloft_position_mode": r.position_mode,
                "kvloft_dtype": str(self.model.dtype).replace("torch.", "")}

    # ---- scoring ---------------------------------------------------------------------------

    def _session(self) -> Session:
        return Session(self.model, self.retrieval, self.runtime)

    def score_continuation(self, context: list[int], continuation: list[int]) -> tuple[float, bool]:
        """(sum of log p(continuation | context), whether greedy decoding gives it) in a fresh session.

        context, continuation: token ids; context non-empty. Context tokens beyond max_length
        (counting the continuation but its last token) are cut from the left, as lm-eval's HF model does.
        One-token continuations of the context scored just before reuse its prefill (lm-eval
        sends a document's options one after another).
        """
        if not context or not continuation:
            raise ValueError("score_continuation needs a non-empty context and continuation")
        keep = self.max_length + 1 - len(continuation)
        if keep < 1:
            raise ValueError(f"the continuation ({len(continuation)} tokens) exceeds max_length={self.max_length}")
        context = context[-keep:]
        if len(continuation) == 1 and self._last_context == context:
            logits = self._last_logits  # a multiple-choice doc's next option of one token: no new prefill
        else:
            s = self._session()
            s.feed(context)
            logits = s.last_logits.float()
            self._last_context, self._last_logits = list(context), logits
        total, greedy = 0.0, True
        for i, tok in enumerate(continuation):  # logits: [V] fp32, the next token's after the context so far
            total += float(torch.log_softmax(logits, dim=-1)[tok])
            greedy = greedy and int(logits.argmax()) == tok
            if i + 1 < len(continuation):
                logits = s.step(tok).float()
        return total, greedy

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs: Any) -> list[tuple[float, bool]]:
        out = []
        for key, context, continuation in tqdm(requests, desc="kvloft loglikelihood", disable=disable_tqdm):
            result = self.score_continuation(context, continuation)
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, result)
            out.append(result)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        out = []
        for (text,) in tqdm([r.args for r in requests], desc="kvloft rolling", disable=disable_tqdm):
            windows = map(make_disjoint_window, get_rolling_token_windows(
                token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length, context_len=1))
            total = sum(self.score_continuation(ctx, pred)[0] for ctx, pred in windows)
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), total)
            out.append(total)
        return out

    # ---- generation ------------------------------------------------------------------------

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        out = []
        for context, gen_kwargs in tqdm([r.args for r in requests], desc="kvloft generate", disable=disable_tqdm):
            text = self._generate(context, dict(gen_kwargs))
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
            out.append(text)
        return out

    def _generate(self, context: str, kw: dict[str, Any]) -> str:
        until = kw.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        max_new = int(kw.pop("max_gen_toks", self.max_gen_toks))
        temperature = float(kw.pop("temperature", 0.0)) if kw.pop("do_sample", False) else 0.0
        top_p = float(kw.pop("top_p", 1.0))
        ids = self.tok_encode(context)
        if not ids:
            ids = [self.prefix_token_id]
        s = self._session()
        s.feed(ids[-max(1, self.max_length - max_new):])
        return s.generate(max_new_tokens=max_new, temperature=temperature, top_p=top_p, stop=until)


def export_tokenizer(model: str | Model, directory: str | Path) -> Path:
    """Write `model`'s tokenizer as an HF tokenizer directory (tokenizer.json + config, chat
    template included), which lm-eval's RULER tasks load with AutoTokenizer: pass the
    directory as `tokenizer=` in --model_args or --metadata. Needs transformers."""
    from transformers import PreTrainedTokenizerFast

    from kvloft.runtime.loader import load_tokenizer

    tok = model.tokenizer if isinstance(model, Model) else load_tokenizer(model)
    if tok is None:
        raise ValueError("this model has no tokenizer (a random-weight preset)")
    name = tok._tok.id_to_token
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok._tok,
        eos_token=name(tok.eos_ids[0]) if tok.eos_ids else None,
        bos_token=name(tok.bos_id) if tok.bos_id is not None else None,
    )
    if tok.chat_template:
        hf.chat_template = tok.chat_template
    hf.save_pretrained(str(directory))
    return Path(directory)


def main(argv: list[str] | None = None) -> None:
    """lm-eval's command line with the `kvloft` model registered."""
    from lm_eval.__main__ import cli_evaluate

    sys.argv = ["lm_eval", *(sys.argv[1:] if argv is None else argv)]
    cli_evaluate()


if __name__ == "__main__":
    main()
