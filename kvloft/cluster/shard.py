"""A shard of a session's host tier: one token range of every layer, its index, its files.

`ShardStore` holds host-tier rows [first_row, first_row + capacity) of one session, per
layer token-major (`ChunkedRows` of [H_kv, D] rows, as the single-process host tier), a
retriever per layer over its own rows (any registered method; ids are local rows), and
an append-only copy on disk (kvloft/cluster/records.py) in its own directory:

    <directory>/store.json         what the store holds (shape, dtype, range, method)
    <directory>/layer-<l>.rec      the rows of layer l: fixed-size records, crc32 each
    <directory>/index.json         per layer, the row count at which the index was built and
                                   the prefill query sample it was built with (sha256)
    <directory>/queries-<l>.safetensors

Opening a store on a directory that holds files reloads them (every record verified) and
replays the index: the build at the recorded row count with the recorded queries, then
the later rows in their original append blocks. A retriever whose index depends only on
those calls (exact, attention_graph, faiss) ends up as it was, so the selections, and a
session's continuation, are identical to a run that never restarted. Retrievers that
adapt at select time (tokenselect, recycled) restart their adaptive state.

Everything a shard computes is next to its data: decode-time partial attention over its
own top-`budget` rows per KV head (`attend`), the scores of those rows for a global
top-k (`candidates` + `attend_ids`), and dense attention of a prefill chunk over all its
rows (`prefill`). Each returns (out, lse) for the driver's log-sum-exp merge.

`KVShard` is the process (a Ray actor: `ray.remote(KVShard)`, see kvloft/cluster/group.py):
it hosts the stores of any number of sessions, keyed by their directory. Appends carry the
global row of their first token and are idempotent, so a driver can resend a call whose
reply it never got.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from kvloft.cluster.records import RecordFile, bytes_to_tensor_rows
from kvloft.config import ModelConfig, RetrievalConfig
from kvloft.index.base import make_retriever
from kvloft.kernels import reference
from kvloft.runtime.chunked import ChunkedRows

FORMAT = "kvloft-shard"
FORMAT_VERSION = 1

# (k [n, H_kv, D], v [n, H_kv, D], positions [n] int64, global row of k[0])
Block = tuple[Tensor, Tensor, Tensor, int]


class StoreNotOpen(LookupError):
    """The shard process does not hold this store (it was restarted): open it again."""


@dataclass(frozen=True)
class StoreSpec:
    """What one store of a sharded session keeps, and where (sent to the shard process).

    directory: the store's own directory (created; reloaded when it holds files).
    first_row, capacity: the host-tier rows [first_row, first_row + capacity) it owns.
    dtype: torch dtype name of the K/V rows ("float32", "bfloat16", "float16").
    indexed: layers whose index is live from the first row on (a store opened after the
        session built its indexes: its rows are indexed as they arrive).
    fsync: os.fsync after every append (survives power loss, costs a disk sync per call).
    """

    directory: str
    first_row: int
    capacity: int
    model: ModelConfig
    retrieval: RetrievalConfig
    dtype: str = "float32"
    indexed: tuple[int, ...] = ()
    fsync: bool = False
    chunk_rows: int = 4096

    def identity(self) -> dict[str, Any]:
        """What must match between a store's files and the spec that reopens them."""
        m = self.model
        return {"format": FORMAT, "format_version": FORMAT_VERSION, "first_row": self.first_row,
                "capacity": self.capacity, "n_layers": m.n_layers, "n_kv_heads": m.n_kv_heads,
                "head_dim": m.head_dim, "dtype": self.dtype, "method": self.retrieval.method,
                "options": self.retrieval.options, "gqa_reduce": self.retrieval.gqa_reduce}


def _empty_partial(q: Tensor) -> tuple[Tensor, Tensor]:
    """No keys: out 0, lse -inf (merge ignores it). q [..., H_q, D]."""
    return q.new_zeros(q.shape), torch.full(q.shape[:-1], float("-inf"), dtype=torch.float32)


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class ShardStore:
    """One session's token range: rows per layer, a retriever, the record files."""

    def __init__(self, spec: StoreSpec) -> None:
        self.spec = spec
        m = spec.model
        self.n_layers, self.row_shape = m.n_layers, (m.n_kv_heads, m.head_dim)
        self.dtype = getattr(torch, spec.dtype)
        self.scale = m.head_dim**-0.5
        self.dir = Path(spec.directory)
        _check_writable(self.dir)
        row_bytes = m.n_kv_heads * m.head_dim * torch.empty(0, dtype=self.dtype).element_size()
        chunk = max(1, min(spec.chunk_rows, spec.capacity))
        self.k = [ChunkedRows(self.row_shape, self.dtype, chunk) for _ in range(self.n_layers)]
        self.v = [ChunkedRows(self.row_shape, self.dtype, chunk) for _ in range(self.n_layers)]
        self.pos = [ChunkedRows((), torch.int64, chunk) for _ in range(self.n_layers)]
        self.files = [RecordFile(self.dir / f"layer-{i:03d}.rec", row_bytes, spec.fsync)
                      for i in range(self.n_layers)]
        self.retriever = make_retriever(spec.retrieval, m, "cpu")
        self.indexed = [False] * self.n_layers  # the session asked for this layer's index
        self.live = [False] * self.n_layers  # retriever.build ran for this layer
        self.build_at: dict[int, int] = {}
        self.query_files: dict[int, dict[str, str]] = {}
        self.reloaded_rows, self.dropped_bytes = 0, 0
        self._open_files()

    # ---- opening / reloading -------------------------------------------------------------

    def _open_files(self) -> None:
        meta = self.dir / "store.json"
        want = json.loads(json.dumps(self.spec.identity()))  # as JSON reads it back (tuples -> lists)
        if meta.exists():
            have = json.loads(meta.read_text())
            diff = {k: (have.get(k), v) for k, v in want.items() if have.get(k) != v}
            if diff:
                raise ValueError(f"{self.dir} holds a shard store of another setup ({diff}, as (files, asked)); "
                                 "use another directory or delete it")
        else:
            _write_atomic(meta, json.dumps(want, indent=1).encode())
        index = self.dir / "index.json"
        if index.exists():
            saved = json.loads(index.read_text())
            self.build_at = {int(k): int(v) for k, v in saved["build_at"].items()}
            self.query_files = {int(k): v for k, v in saved["queries"].items()}
        for layer in self.spec.indexed:  # indexed from its first row on
            self.build_at.setdefault(layer, 0)
        for layer in range(self.n_layers):
            self._replay(layer)
        if self.spec.indexed and not index.exists():
            self._save_index()

    def _replay(self, layer: int) -> None:
        """Reload one layer's records and redo its index calls in their original order."""
        loaded = self.files[layer].read()
        self.dropped_bytes += loaded.dropped_bytes
        at = self.build_at.get(layer)
        if at is not None and at > len(loaded.pos):
            raise ValueError(f"{self.files[layer].path}: the index was built over {at} rows but the file holds "
                             f"{len(loaded.pos)}; the store's files are incomplete")
        row = 0
        for n in [*loaded.blocks, 0]:
            if at == row and not self.indexed[layer]:
                self._build_layer(layer, self._load_queries(layer))
            if n == 0:
                break
            s = slice(row, row + n)
            k = bytes_to_tensor_rows(loaded.k[s], self.row_shape, self.dtype)
            v = bytes_to_tensor_rows(loaded.v[s], self.row_shape, self.dtype)
            self._put(layer, k, v, torch.from_numpy(loaded.pos[s].copy()))
            row += n
        self.reloaded_rows += row

    def _load_queries(self, layer: int) -> Tensor | None:
        ref = self.query_files.get(layer)
        if ref is None:
            return None
        path = self.dir / ref["file"]
        if not path.exists() or _sha256(path) != ref["sha256"]:
            raise ValueError(f"{path}: the index's query sample is missing or fails its sha256 check; "
                             "the store's files are damaged")
        from safetensors.torch import load_file

        return load_file(str(path))["queries"]

    def _save_index(self) -> None:
        body = {"build_at": {str(k): v for k, v in self.build_at.items()},
                "queries": {str(k): v for k, v in self.query_files.items()}}
        _write_atomic(self.dir / "index.json", json.dumps(body, indent=1).encode())

    # ---- rows and index ------------------------------------------------------------------

    def rows(self, layer: int) -> int:
        return len(self.k[layer])

    def _put(self, layer: int, k: Tensor, v: Tensor, pos: Tensor) -> None:
        """Rows into memory and, once the layer is indexed, into its index (as one block)."""
        self.k[layer].append(k)
        self.v[layer].append(v)
        self.pos[layer].append(pos)
        if not self.indexed[layer]:
            return
        keys = k.transpose(0, 1).contiguous()  # [H_kv, n, D]
        if self.live[layer]:
            self.retriever.add(layer, keys, pos)
        else:  # the first rows of a layer indexed while empty: they build it
            self.retriever.build(layer, keys, None)
            self.live[layer] = True

    def _build_layer(self, layer: int, queries: Tensor | None) -> None:
        self.indexed[layer] = True
        if self.rows(layer):
            keys = self.k[layer].all().transpose(0, 1).contiguous()  # [H_kv, N, D]
            self.retriever.build(layer, keys, queries)
            self.live[layer] = True

    def append(self, layer: int, block: Block) -> int:
        """Store a block (written to disk before memory). Idempotent: rows already held are
        skipped, so a resent call is harmless. Returns the layer's row count."""
        k, v, pos, first = block
        local, have = first - self.spec.first_row, self.rows(layer)
        if local > have or local < 0:
            raise ValueError(f"store {self.dir}: layer {layer} holds rows [{self.spec.first_row}, "
                             f"{self.spec.first_row + have}), an append at row {first} would leave a gap")
        skip = have - local
        if skip >= k.shape[0]:
            return have
        k, v, pos = k[skip:], v[skip:], pos[skip:].to(torch.int64)
        if have + k.shape[0] > self.spec.capacity:
            raise ValueError(f"store {self.dir}: {have + k.shape[0]} rows exceed its capacity of "
                             f"{self.spec.capacity} (ShardConfig.shard_tokens)")
        k, v = k.to("cpu", self.dtype), v.to("cpu", self.dtype)
        self.files[layer].append(pos, k, v)
        self._put(layer, k, v, pos)
        return self.rows(layer)

    def build(self, queries: dict[int, Tensor | None]) -> None:
        """Index the given layers over the rows held now (queries [H_q, M, D] or None each)."""
        from safetensors.torch import save_file

        todo = [layer for layer in sorted(queries) if not self.indexed[layer]]
        for layer in todo:
            self.build_at[layer] = self.rows(layer)
            q = queries[layer]
            if q is not None:
                path = self.dir / f"queries-{layer:03d}.safetensors"
                save_file({"queries": q.detach().to("cpu").contiguous()}, str(path))
                self.query_files[layer] = {"file": path.name, "sha256": _sha256(path)}
        if todo:
            self._save_index()  # recorded before building: a restart replays the same build
        for layer in todo:
            self._build_layer(layer, queries[layer])

    # ---- attention next to the data ------------------------------------------------------

    def attend(self, layer: int, q: Tensor, budget: int) -> tuple[Tensor, Tensor, int]:
        """One decode query q [H_q, D] over this store's top-`budget` rows per KV head
        (its own retriever) -> (out [H_q, D], lse [H_q] fp32, keys scanned)."""
        if self.rows(layer) == 0 or budget == 0:
            return (*_empty_partial(q), 0)
        self._check_indexed(layer)
        sel = self.retriever.select(layer, q, budget)
        return (*self.attend_ids(layer, q, sel.ids), sel.scanned)

    def attend_ids(self, layer: int, q: Tensor, ids: Tensor) -> tuple[Tensor, Tensor]:
        """q [H_q, D] over local rows ids [H_kv, k] or [k] (-1 = pad) -> (out [H_q, D], lse [H_q])."""
        from kvloft.index.attention_graph import cpu_partial_attention

        return cpu_partial_attention(q.to("cpu"), self.k[layer], self.v[layer], ids.to("cpu"), scale=self.scale)

    def candidates(self, layer: int, q: Tensor, budget: int) -> tuple[Tensor, Tensor, int]:
        """This store's top-`budget` rows per KV head with their group-reduced logits (the
        exact retriever's ranking score), for a global top-k: q [H_q, D] -> (scores [H_kv, k]
        fp32, -inf = pad; ids [H_kv, k] int64 local rows, -1 = pad; keys scanned)."""
        hkv = self.row_shape[0]
        if self.rows(layer) == 0 or budget == 0:
            empty = torch.empty((hkv, 0))
            return empty, empty.long(), 0
        self._check_indexed(layer)
        sel = self.retriever.select(layer, q, budget)
        ids = (sel.ids if sel.ids.dim() == 2 else sel.ids[None].expand(hkv, -1)).to("cpu")
        safe = ids.clamp_min(0)
        heads = torch.arange(hkv)[:, None].expand_as(ids)
        keys = self.k[layer].rows(safe, heads).float()  # [H_kv, k, D]
        qg = q.to("cpu", torch.float32).view(hkv, -1, keys.shape[-1])  # [H_kv, g, D]
        logits = torch.bmm(qg, keys.transpose(1, 2))  # [H_kv, g, k]
        how = self.spec.retrieval.gqa_reduce
        scores = logits.amax(dim=1) if how == "max" else logits.sum(dim=1)
        return scores.masked_fill(ids < 0, float("-inf")), ids, sel.scanned

    def prefill(self, layer: int, q: Tensor) -> tuple[Tensor, Tensor]:
        """Dense attention of a prefill chunk q [T, H_q, D] over every row held (chunk by
        chunk, merged) -> (out [T, H_q, D], lse [T, H_q] fp32)."""
        q = q.to("cpu")
        parts = [reference.attend(q, kc, vc, scale=self.scale)
                 for (_, kc), (_, vc) in zip(self.k[layer].iter_chunks(), self.v[layer].iter_chunks())]
        if not parts:
            return _empty_partial(q)
        if len(parts) == 1:
            return parts[0]
        return reference.merge([o for o, _ in parts], [lse for _, lse in parts])

    def _check_indexed(self, layer: int) -> None:
        if not self.indexed[layer]:
            raise ValueError(f"store {self.dir}: layer {layer} has no index yet; the session builds it "
                             "after its first prefill (ShardedAttention.build_indexes)")

    # ---- reports and cleanup -------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        nbytes = sum(s.nbytes for rows in (self.k, self.v, self.pos) for s in rows)
        return {"directory": str(self.dir), "first_row": self.spec.first_row, "rows": self.rows(0),
                "host_bytes": nbytes, "reloaded_rows": self.reloaded_rows, "dropped_bytes": self.dropped_bytes,
                "retriever": self.retriever.stats()}

    def close(self, delete: bool = False) -> None:
        for f in self.files:
            f.close()
        if hasattr(self.retriever, "close"):
            self.retriever.close()
        if delete:
            shutil.rmtree(self.dir, ignore_errors=True)


def _check_writable(directory: Path) -> None:
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / ".write-probe"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise ValueError(f"shard directory {directory} is not writable ({e.strerror or e}); name a directory "
                         "this process can write (ShardConfig.directory)") from e


class KVShard:
    """One shard process: the stores of any number of sessions, keyed by store directory.

    Run it as a Ray actor (`ray.remote(KVShard)`; kvloft/cluster/group.py places them).
    Calls on a store this process does not hold raise StoreNotOpen; the session then
    opens it again (`open`), which reloads it from its files.
    """

    def __init__(self) -> None:
        self.stores: dict[str, ShardStore] = {}

    def _store(self, key: str) -> ShardStore:
        store = self.stores.get(key)
        if store is None:
            raise StoreNotOpen(f"this shard process does not hold store {key} (restarted?); open it again")
        return store

    def open(self, spec: StoreSpec) -> dict[str, Any]:
        """Open (or reload from its files) the store `spec.directory`; returns its stats."""
        if spec.directory not in self.stores:
            self.stores[spec.directory] = ShardStore(spec)
        return self.stores[spec.directory].stats()

    def close(self, key: str, delete: bool = False) -> None:
        """Drop a store from memory (its files stay unless `delete`)."""
        store = self.stores.pop(key, None)
        if store is not None:
            store.close(delete)
        elif delete:
            shutil.rmtree(key, ignore_errors=True)

    def append(self, key: str, layer: int, block: Block) -> int:
        """Store a block of one layer (idempotent by row); returns the layer's row count."""
        return self._store(key).append(layer, block)

    def attend(self, key: str, layer: int, q: Tensor, budget: int):
        """Partial attention of q [H_q, D] over the store's top-`budget` rows: (out, lse, scanned)."""
        return self._store(key).attend(layer, q, budget)

    def step(self, key: str, layer: int, q: Tensor | None, budget: int, block: Block | None):
        """One decode step of one layer: append the block (if any), then attend with q (if
        any). Returns (out [H_q, D], lse [H_q], scanned) or None without q."""
        store = self._store(key)
        if block is not None:
            store.append(layer, block)
        return None if q is None else store.attend(layer, q, budget)

    def candidates(self, key: str, layer: int, q: Tensor, budget: int, block: Block | None):
        """Round one of a global top-k decode step: append, then this store's scored top-k."""
        store = self._store(key)
        if block is not None:
            store.append(layer, block)
        return store.candidates(layer, q, budget)

    def attend_ids(self, key: str, layer: int, q: Tensor, ids: Tensor):
        """Round two of a global top-k step: attention over the rows the driver kept."""
        return self._store(key).attend_ids(layer, q, ids)

    def prefill(self, key: str, layer: int, q: Tensor | None, block: Block | None):
        """A prefill chunk of one layer: dense attention over the rows held before this call
        (if q), then append the chunk's evicted rows (if any)."""
        store = self._store(key)
        out = None if q is None else store.prefill(layer, q)
        if block is not None:
            store.append(layer, block)
        return out

    def build(self, key: str, queries: dict[int, Tensor | None]) -> None:
        self._store(key).build(queries)

    def stats(self, key: str) -> dict[str, Any]:
        return self._store(key).stats()

    def where(self) -> dict[str, Any]:
        """The node and process this shard runs in (node_id is Ray's, when run as an actor)."""
        node = None
        try:
            import ray

            if ray.is_initialized():
                node = ray.get_runtime_context().get_node_id()
        except ImportError:
            pass
        return {"node_id": node, "pid": os.getpid(), "stores": sorted(self.stores)}


__all__ = ["Block", "KVShard", "ShardStore", "StoreNotOpen", "StoreSpec"]
