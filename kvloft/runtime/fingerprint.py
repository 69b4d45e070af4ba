"""What identifies a model for a saved session: its config, dtype and a hash of some weights."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

import torch
from torch import Tensor

__all__ = ["check_model", "model_fingerprint"]

_FINGERPRINT_ROWS = 256  # rows of the embedding hashed into the model fingerprint


def model_fingerprint(model) -> dict[str, Any]:
    """What identifies a model for a save: its config, dtype and a sha256 of some weights."""
    net = model.net
    h = hashlib.sha256()
    # a quantized linear (runtime/quant_linear.py) is fingerprinted by its packed values (the
    # same bytes whether it holds them or only PyTorch's int4 layout)
    linear = lambda m: m.packed.qweight if getattr(m, "weight", None) is None else m.weight
    picks = [net.embed_tokens.weight[:_FINGERPRINT_ROWS], linear(net.layers[0].self_attn.q_proj),
             linear(net.layers[-1].mlp.down_proj), net.norm.weight]
    for t in picks:
        h.update(_tensor_bytes(t))
    return {
        "config": _jsonable(dataclasses.asdict(model.config)),
        "dtype": str(model.dtype).removeprefix("torch."),
        "weights_sha256": h.hexdigest(),
        "source": model.source,
    }


def check_model(saved: dict[str, Any], model) -> None:
    """ValueError naming the difference if `model` is not the one `saved` (a fingerprint) identifies."""
    here = model_fingerprint(model)
    if saved.get("config") != here["config"]:
        diff = sorted(k for k in here["config"] if saved.get("config", {}).get(k) != here["config"][k])
        raise ValueError(f"the save is for another model ({saved.get('source')}): config differs in {diff}; "
                         f"load it with the model it was saved with")
    if saved.get("dtype") != here["dtype"]:
        raise ValueError(f"the save holds {saved.get('dtype')} KV, the model runs in {here['dtype']}; "
                         f"load the model with dtype={saved.get('dtype')!r}")
    if saved.get("weights_sha256") != here["weights_sha256"]:
        raise ValueError(f"the save is for other weights ({saved.get('source')}) than this model's "
                         f"({here['source']}): the weight fingerprints differ")


def _tensor_bytes(t: Tensor) -> bytes:
    t = t.detach().to("cpu").contiguous()
    return t.reshape(-1).view(torch.uint8).numpy().tobytes()


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj))
