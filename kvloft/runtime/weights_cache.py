"""A one-time on-disk cache of GGUF checkpoints converted to a torch dtype.

Dequantizing a GGUF and parsing its header (150K-token vocabularies) take tens of seconds;
the result is saved once, under `<cache dir>/converted/`, as
    <sha256 of the GGUF>-<dtype>-v<FORMAT>.safetensors   the weights, HF names, HF layout
    <same stem>.json                                      the ModelConfig and tokenizer fields
and read back in a few seconds. The sha256 is computed once per file and remembered by
(path, size, mtime) in `index.json`, so a second load need not rehash the file. Every file
is written to a temporary name and renamed into place, so a crash leaves no half file.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from kvloft.config import ModelConfig
from kvloft.runtime import safetensors_io

log = logging.getLogger(__name__)

FORMAT = 1  # bump when the conversion (names, layout) changes: old entries are then ignored


def _dir(root: Path) -> Path:
    return root / "converted"


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def file_sha256(path: Path, root: Path) -> str:
    """sha256 of a file, remembered by (resolved path, size, mtime_ns) in root/converted/index.json."""
    st = path.stat()
    key = str(path.resolve())
    index_path = _dir(root) / "index.json"
    try:
        index = json.loads(index_path.read_text())
    except (OSError, ValueError):
        index = {}
    hit = index.get(key)
    if hit and hit.get("size") == st.st_size and hit.get("mtime_ns") == st.st_mtime_ns:
        return hit["sha256"]
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    index[key] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": h.hexdigest()}
    _dir(root).mkdir(parents=True, exist_ok=True)
    _atomic_write_text(index_path, json.dumps(index, indent=1))
    return h.hexdigest()


def entry_stem(path: Path, dtype: torch.dtype, root: Path) -> Path:
    dt = str(dtype).removeprefix("torch.")
    return _dir(root) / f"{file_sha256(path, root)}-{dt}-v{FORMAT}"


def lookup(stem: Path) -> tuple[ModelConfig, dict[str, Any], Path] | None:
    """(config, tokenizer fields, weights file) of a cache entry, or None when absent or unreadable."""
    meta, weights = stem.with_suffix(".json"), stem.with_suffix(".safetensors")
    if not (meta.is_file() and weights.is_file()):
        return None
    try:
        data = json.loads(meta.read_text())
        cfg = data["config"]
        cfg["eos_token_ids"] = tuple(cfg["eos_token_ids"])
        return ModelConfig(**cfg), data["tokenizer"], weights
    except (OSError, ValueError, KeyError, TypeError) as e:
        log.warning("ignoring the unreadable cache entry %s (%s)", meta, e)
        return None


def store(stem: Path, cfg: ModelConfig, tokenizer_fields: dict[str, Any],
          tensors: Iterable[tuple[str, Tensor]]) -> None:
    """Write one entry (weights first, then the .json that marks it complete)."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    weights = stem.with_suffix(".safetensors")
    tmp = weights.with_name(f".{weights.name}.{os.getpid()}.tmp")
    try:
        safetensors_io.write(tmp, tensors)
        os.replace(tmp, weights)
    finally:
        tmp.unlink(missing_ok=True)
    meta = {"config": dataclasses.asdict(cfg), "tokenizer": tokenizer_fields, "format": FORMAT}
    _atomic_write_text(stem.with_suffix(".json"), json.dumps(meta))
    log.info("cached converted weights in %s", weights)
