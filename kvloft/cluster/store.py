"""A stage's files: every token's KV of the stage's layers, and when its indexes were built.

    <directory>/stage.json            what the files hold (layer range, shape, dtype, method)
    <directory>/layer-<l>.rec         layer l (global index): one checksummed record per token,
                                      in the order the stage attended to them, one block per
                                      call (kvloft/cluster/records.py)
    <directory>/index.json            the token count at which the indexes were built, and the
                                      prefill query sample of each layer (sha256 of its file)
    <directory>/queries-<l>.safetensors

A stage writes a call's rows before it attends with them, so every token the driver saw
through the last stage is on disk. `replay(upto)` reads the records back (every crc checked),
cuts anything after the first `upto` tokens (a call the driver never confirmed, or a torn
tail) and yields the calls in order, with the index build where it happened, for a runner
to redo (kvloft/cluster/stage.py).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from kvloft.cluster.records import CorruptRecord, RecordFile, bytes_to_tensor_rows
from kvloft.config import CacheConfig, ModelConfig, RetrievalConfig, RuntimeConfig

FORMAT = "kvloft-stage"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class StageSpec:
    """One session's state on one stage (sent to the stage process).

    directory: the stage's own directory (created; replayed when it holds files).
    layers: the global layer range [start, stop) the stage runs.
    dtype: torch dtype name of the K/V rows ("float32", "bfloat16", "float16").
    fsync: os.fsync after every append.
    """

    directory: str
    layers: tuple[int, int]
    model: ModelConfig
    retrieval: RetrievalConfig
    runtime: RuntimeConfig
    cache: CacheConfig
    dtype: str = "float32"
    fsync: bool = False

    def identity(self) -> dict[str, Any]:
        """What must match between a stage's files and the spec that reopens them."""
        m, r = self.model, self.retrieval
        return {"format": FORMAT, "format_version": FORMAT_VERSION, "layers": list(self.layers),
                "n_kv_heads": m.n_kv_heads, "head_dim": m.head_dim, "dtype": self.dtype, "method": r.method,
                "options": r.options, "n_sink": r.n_sink, "n_window": r.n_window}


@dataclass
class Block:
    """One recorded call: per local layer k, v [n, H_kv, D] and positions [n] int64."""

    k: list[Tensor]
    v: list[Tensor]
    pos: list[Tensor]


class StageStore:
    """A stage's record files for one session."""

    def __init__(self, spec: StageSpec) -> None:
        self.spec = spec
        self.dir = Path(spec.directory)
        check_writable(self.dir)
        m = spec.model
        self.dtype = getattr(torch, spec.dtype)
        self.row_shape = (m.n_kv_heads, m.head_dim)
        row_bytes = m.n_kv_heads * m.head_dim * torch.empty(0, dtype=self.dtype).element_size()
        start, stop = spec.layers
        self.files = [RecordFile(self.dir / f"layer-{i:03d}.rec", row_bytes, spec.fsync) for i in range(start, stop)]
        self.built_at: int | None = None
        self.queries: dict[int, dict[str, str]] = {}
        self._check_identity()

    def _check_identity(self) -> None:
        meta = self.dir / "stage.json"
        want = json.loads(json.dumps(self.spec.identity()))  # as JSON reads it back (tuples -> lists)
        if meta.exists():
            have = json.loads(meta.read_text())
            diff = {k: (have.get(k), v) for k, v in want.items() if have.get(k) != v}
            if diff:
                raise ValueError(f"{self.dir} holds the files of another stage setup ({diff}, as (files, asked)); "
                                 "use another directory or delete it")
        else:
            write_atomic(meta, json.dumps(want, indent=1).encode())
        index = self.dir / "index.json"
        if index.exists():
            saved = json.loads(index.read_text())
            self.built_at = saved["built_at"]
            self.queries = {int(k): v for k, v in saved["queries"].items()}

    # ---- writing -------------------------------------------------------------------------

    def append(self, local: int, k: Tensor, v: Tensor, pos: Tensor) -> None:
        """One call's rows of local layer `local`: k, v [n, H_kv, D], pos [n] (flushed)."""
        self.files[local].append(pos, k, v)

    def mark_built(self, n_tokens: int, samples: dict[int, Tensor | None]) -> None:
        """Record that the indexes were built after n_tokens tokens from these query samples
        (local layer -> [H_q, M, D] or None); written before the build runs."""
        from safetensors.torch import save_file

        for local, q in samples.items():
            if q is not None:
                path = self.dir / f"queries-{local:03d}.safetensors"
                save_file({"queries": q.detach().to("cpu").contiguous()}, str(path))
                self.queries[local] = {"file": path.name, "sha256": sha256(path)}
        self.built_at = n_tokens
        body = {"built_at": n_tokens, "queries": {str(k): v for k, v in self.queries.items()}}
        write_atomic(self.dir / "index.json", json.dumps(body, indent=1).encode())

    # ---- reading -------------------------------------------------------------------------

    def replay(self, upto: int) -> Iterator[Block | int]:
        """The recorded calls covering the first `upto` tokens, in order, with the index build
        as the int token count where it happened. Records past `upto` are cut from the files;
        fewer than `upto` tokens on disk is a CorruptRecord (records were lost)."""
        loaded = []
        for f in self.files:
            got = f.read()
            blocks, cut = _blocks_upto(got.blocks, upto, f.path)
            if cut < len(got.pos):
                f.close()
                os.truncate(f.path, cut * f.record_size)
            loaded.append((got, blocks))
        row = 0
        for b in range(len(loaded[0][1])):
            if self.built_at == row:
                yield row
            sizes = {blocks[b] for _, blocks in loaded}
            if len(sizes) != 1:
                raise CorruptRecord(f"{self.dir}: the layers' record files disagree on call {b} ({sorted(sizes)} rows)")
            n = sizes.pop()
            s = slice(row, row + n)
            yield Block([bytes_to_tensor_rows(g.k[s], self.row_shape, self.dtype) for g, _ in loaded],
                        [bytes_to_tensor_rows(g.v[s], self.row_shape, self.dtype) for g, _ in loaded],
                        [torch.from_numpy(g.pos[s].copy()) for g, _ in loaded])
            row += n
        if self.built_at is not None and self.built_at == row:
            yield row

    def query_sample(self, local: int) -> Tensor | None:
        ref = self.queries.get(local)
        if ref is None:
            return None
        path = self.dir / ref["file"]
        if not path.exists() or sha256(path) != ref["sha256"]:
            raise CorruptRecord(f"{path}: the index's query sample is missing or fails its sha256 check; the "
                                "stage's files are damaged")
        from safetensors.torch import load_file

        return load_file(str(path))["queries"]

    def close(self, delete: bool = False) -> None:
        for f in self.files:
            f.close()
        if delete:
            shutil.rmtree(self.dir, ignore_errors=True)


def _blocks_upto(blocks: list[int], upto: int, path: Path) -> tuple[list[int], int]:
    """The leading blocks that make exactly `upto` rows, and that row count."""
    kept, rows = [], 0
    for n in blocks:
        if rows + n > upto:
            break
        kept.append(n)
        rows += n
    if rows != upto:
        raise CorruptRecord(f"{path}: holds {rows} token(s) in whole calls where the session confirmed {upto}; "
                            "records were lost (a disk without fsync lost its node?); start the session again")
    return kept, rows


def write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def check_writable(directory: Path) -> None:
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / ".write-probe"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise ValueError(f"stage directory {directory} is not writable ({e.strerror or e}); name a directory "
                         "this process can write (PipelineConfig.directory)") from e
