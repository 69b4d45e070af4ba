"""Save a session to a directory and read it back (`Session.save` / `Session.load`).

    s.save("ctx.kvloft")                        # tiers, tokens, logits, configs, retriever state
    s2 = kvloft.Session.load("ctx.kvloft", model)
    assert s2.generate(8) == s.generate(8)      # greedy: the same next tokens

Layout of a save directory:

    ctx.kvloft/
      CURRENT                   name of the live generation (replaced atomically: the commit point)
      gen-<time>-<id>/
        manifest.json           format and kvloft versions, model identity, configs, scalar
                                state, and the size and sha256 of every file below
        kv.safetensors          static tiers (buffers + ring state in the manifest), host chunks,
                                tokens, last logits
        retriever.safetensors   the tensors of the retriever's state_dict() (if any)

Crash safety: a save writes a new generation into a temporary directory, fsyncs every
file, renames the directory into place, then replaces CURRENT (write a temporary file,
fsync, `os.replace`). A crash at any point leaves the previous save loadable; leftovers
are removed by the next successful save. One writer per directory at a time.

Loading checks everything before it builds anything (read_save): the manifest parses,
versions match, every file has its recorded size and sha256, the model has the same config,
dtype and weight fingerprint. Any failure raises ValueError naming the reason; nothing is
modified. Session.load then builds a session with the saved configs and restore_session fills
it. This module never imports the session: it reads and writes state dicts and manifests
through the session's public state methods (session_state.py takes the state apart and puts
it back; Session.fork uses the same in memory).

Retriever state: a retriever's key mirror is never written (it equals the host tier).
Loading rebuilds each built layer from the host tier (`TieredAttention.rebuild_indexes`:
`retriever.build(layer, host_keys, None)`, or `attach_host_tier` where the retriever reads
the tier in place) and then, if the retriever has `load_state_dict`, restores what build
cannot know from its `state_dict()`: selection caches, stage masks, schedules, graphs,
counters. exact, tokenselect, recycled, hip (stage masks, refresh schedule), actqkv (query
window and statistics) and attention_graph (the graph learned from prefill queries and
grown by decode) carry such pairs and continue exactly as the saved session would
(tests/runtime/test_persist.py). A retriever without that pair is only rebuilt and its
counters start at zero: faiss builds its index again from all host keys in one batch, which
for "hnsw" and "ivf" may differ from the index the session grew step by step ("flat" is
exact), so its selections, and the tokens that follow, may differ.

The manifest carries the sha256 of its own fields (`manifest_sha256`): an edited or
damaged manifest is refused before anything is built, and the ring state it describes is
checked against the static tier it is loaded into.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

from torch import Tensor

from kvloft.config import CacheConfig, RetrievalConfig, RuntimeConfig
from kvloft.runtime.attention import TieredAttention
from kvloft.runtime.durable import fsync_dir, sha256, write_durable, write_safetensors
from kvloft.runtime.fingerprint import check_model, model_fingerprint
from kvloft.runtime.session_state import collect_state, restore_retriever, restore_state
from kvloft.version import __version__

FORMAT = "kvloft-session"
FORMAT_VERSION = 2  # 2: the manifest carries the sha256 of its own fields
CURRENT = "CURRENT"
MANIFEST = "manifest.json"
MANIFEST_DIGEST = "manifest_sha256"  # of every other field, canonical JSON (_manifest_digest)
KV_FILE = "kv.safetensors"
RETRIEVER_FILE = "retriever.safetensors"
_GEN_RE = re.compile(r"gen-[0-9]+-[0-9a-f]{8}")


# ---- public API ----------------------------------------------------------------------------


def save_session(session, path: str | os.PathLike) -> Path:
    """Write `session` to the directory `path` (created, or a previous save replaced). Returns it."""
    root = Path(path)
    _check_target(root)
    tensors, retr_tensors, manifest = _collect(session)
    root.mkdir(parents=True, exist_ok=True)
    gen = f"gen-{time.time_ns()}-{uuid.uuid4().hex[:8]}"
    tmp = root / f".tmp-{gen}"
    tmp.mkdir()
    files = {KV_FILE: tensors}
    if retr_tensors:
        files[RETRIEVER_FILE] = retr_tensors
    manifest["files"] = {name: write_safetensors(tmp / name, t, {"format": FORMAT}) for name, t in files.items()}
    manifest[MANIFEST_DIGEST] = _manifest_digest(manifest)
    write_durable(tmp / MANIFEST, json.dumps(manifest, indent=1).encode())
    fsync_dir(tmp)
    os.rename(tmp, root / gen)
    fsync_dir(root)
    _publish(root, gen)
    _clean(root, keep=gen)
    return root


@dataclasses.dataclass
class SavedSession:
    """A save read and checked by read_save(), to be restored into a new session."""

    gen_dir: Path  # the live generation's directory
    manifest: dict[str, Any]
    retrieval: RetrievalConfig
    cache: CacheConfig
    runtime: RuntimeConfig  # as saved; Session.load may override it


def read_save(path: str | os.PathLike, model) -> SavedSession:
    """Read and check a save made by `save_session` for `model`: ValueError, touching nothing, if
    it is missing, corrupted, truncated, of another format/kvloft version, or of another model."""
    gen_dir = _current_generation(Path(path))
    manifest = _read_manifest(gen_dir)
    _verify_files(gen_dir, manifest)
    check_model(manifest["model"], model)
    try:
        retrieval = RetrievalConfig(**manifest["configs"]["retrieval"])
        cache = CacheConfig(**manifest["configs"]["cache"])
        runtime = RuntimeConfig(**manifest["configs"]["runtime"])
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{gen_dir / MANIFEST}: saved configs are unreadable ({e})") from e
    return SavedSession(gen_dir, manifest, retrieval, cache, runtime)


def restore_session(session, saved: SavedSession) -> None:
    """Fill a new session, built with the saved configs, with the saved tiers, tokens and
    retriever state; ValueError if the save does not fit it."""
    try:
        _restore(session, saved.gen_dir, saved.manifest)
    except (KeyError, IndexError, TypeError, ValueError, RuntimeError, AssertionError) as e:
        raise ValueError(f"{saved.gen_dir}: the save is internally inconsistent ({type(e).__name__}: {e})") from e


# ---- collecting state ------------------------------------------------------------------------


def _collect(session) -> tuple[dict[str, Tensor], dict[str, Tensor], dict[str, Any]]:
    """Tensors of kv.safetensors, tensors of the retriever state, and the manifest (no files yet)."""
    tensors, retr_tensors, state = collect_state(session)
    manifest: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "kvloft_version": __version__,
        "saved_at": time.time(),
        "model": model_fingerprint(session.model),
        "configs": {"retrieval": _config_json(session.retrieval, "retrieval"),
                    "runtime": _config_json(session.runtime, "runtime"),
                    "cache": _config_json(session.cache_cfg, "cache")},
        **state,
    }
    return {k: _cpu(t) for k, t in tensors.items()}, {k: _cpu(t) for k, t in retr_tensors.items()}, manifest


def _config_json(cfg, name: str) -> dict[str, Any]:
    d = dataclasses.asdict(cfg)
    try:
        json.dumps(d)
    except TypeError as e:
        raise ValueError(f"the {name} config cannot be saved: a field is not JSON ({e}); "
                         "use plain numbers, strings, lists and dicts in options") from e
    return d


# ---- restoring state -------------------------------------------------------------------------


def _restore(session, gen_dir: Path, manifest: dict[str, Any]) -> None:
    from safetensors import safe_open

    with safe_open(str(gen_dir / KV_FILE), framework="pt", device="cpu") as f:
        restore_state(session, f, manifest)
    if isinstance(session.backend, TieredAttention):
        restore_retriever(session.backend, _saved_retriever_state(gen_dir, manifest["retriever"]))


def _saved_retriever_state(gen_dir: Path, meta: dict[str, Any]) -> dict[str, Any] | None:
    """The retriever's state_dict() as saved (scalars from the manifest, tensors from their file)."""
    if meta["state"] is None:
        return None
    state = dict(meta["state"])
    if meta.get("tensor_keys"):
        from safetensors.torch import load_file

        loaded = load_file(str(gen_dir / RETRIEVER_FILE))
        state.update({k.removeprefix("retriever."): v for k, v in loaded.items()})
    return state


# ---- checks ----------------------------------------------------------------------------------


def _check_target(root: Path) -> None:
    if root.exists() and not root.is_dir():
        raise ValueError(f"cannot save a session to {root}: it is a file; give a directory path")
    if root.is_dir() and any(root.iterdir()) and not (root / CURRENT).is_file():
        raise ValueError(f"refusing to save into {root}: a non-empty directory that is not a kvloft "
                         "session save; give a new or empty directory")


def _current_generation(root: Path) -> Path:
    if not (root / CURRENT).is_file():
        raise ValueError(f"{root} is not a kvloft session save (no {CURRENT} file); save one with session.save()")
    name = (root / CURRENT).read_bytes().decode("ascii", errors="replace").strip()
    if not _GEN_RE.fullmatch(name) or not (root / name).is_dir():
        raise ValueError(f"{root / CURRENT} names {name[:80]!r}, which is not a generation in {root}; "
                         "the save is corrupted")
    return root / name


def _read_manifest(gen_dir: Path) -> dict[str, Any]:
    try:
        manifest = json.loads((gen_dir / MANIFEST).read_bytes())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{gen_dir / MANIFEST} cannot be read as JSON ({e}); the save is corrupted") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ValueError(f"{gen_dir / MANIFEST} is not a kvloft session manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"the save has format version {manifest.get('format_version')!r}; this kvloft reads "
                         f"version {FORMAT_VERSION}; re-create the session with this version")
    if manifest.get("kvloft_version") != __version__:
        raise ValueError(f"the save was written by kvloft {manifest.get('kvloft_version')!r}, this is kvloft "
                         f"{__version__}; load it with that version or re-create the session")
    if manifest.get(MANIFEST_DIGEST) != _manifest_digest(manifest):
        raise ValueError(f"{gen_dir / MANIFEST} was edited or corrupted: its fields do not match their "
                         f"sha256 ({MANIFEST_DIGEST}); the save cannot be trusted, re-create it from its session")
    for key in ("files", "model", "configs", "session"):
        if key not in manifest:
            raise ValueError(f"{gen_dir / MANIFEST} lacks {key!r}; the save is corrupted")
    return manifest


def _manifest_digest(manifest: dict[str, Any]) -> str:
    """sha256 of the manifest's fields but the digest itself, as canonical JSON (sorted keys)."""
    body = {k: v for k, v in manifest.items() if k != MANIFEST_DIGEST}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _verify_files(gen_dir: Path, manifest: dict[str, Any]) -> None:
    files = manifest["files"]
    if KV_FILE not in files:
        raise ValueError(f"{gen_dir / MANIFEST} lists no {KV_FILE}; the save is corrupted")
    for name, rec in files.items():
        if name not in (KV_FILE, RETRIEVER_FILE):
            raise ValueError(f"{gen_dir / MANIFEST} lists an unexpected file {name!r}")
        p = gen_dir / name
        if not p.is_file():
            raise ValueError(f"{p} is missing; the save is incomplete")
        size = p.stat().st_size
        if size != rec.get("bytes"):
            raise ValueError(f"{p} has {size} bytes, the manifest says {rec.get('bytes')}: truncated or altered")
        if sha256(p) != rec.get("sha256"):
            raise ValueError(f"{p} does not match its sha256 in the manifest: the file is corrupted")


# ---- files ----------------------------------------------------------------------------------


def _clean(root: Path, keep: str) -> None:
    """Remove older generations and leftovers of interrupted saves."""
    for p in root.iterdir():
        if p.name in (keep, CURRENT):
            continue
        if not (_GEN_RE.fullmatch(p.name) or p.name.startswith(".tmp-")):
            continue
        if p.is_dir():
            shutil.rmtree(p)
        else:
            p.unlink()


def _publish(root: Path, gen: str) -> None:
    """The commit point: CURRENT names the new generation (atomic replace)."""
    tmp = root / f".tmp-{CURRENT}-{uuid.uuid4().hex[:8]}"
    write_durable(tmp, gen.encode("ascii"))
    os.replace(tmp, root / CURRENT)
    fsync_dir(root)


def _cpu(t: Tensor) -> Tensor:
    return t.detach().to("cpu")


