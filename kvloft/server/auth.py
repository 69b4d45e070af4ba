"""API keys and who owns a session.

    keys = Keys(["alice-key", "bob-key"])
    owner = keys.owner_of("alice-key")          # a short tag of the key, or None if unknown
    scoped_id(owner, "doc-1")                   # the manager's id: another key's "doc-1" is another session

Sessions belong to the credential that made them: with keys set, a session id names a
session only for the key that sent it, so another key asking for the same id gets a
different (new) session, and GET/DELETE of it answers 404, as for an unknown id. Without
keys every client shares one namespace (the server then listens on loopback by default).
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable
from pathlib import Path

from kvloft.server.manager import SESSION_ID_RE

SHARED = ""  # the owner of every session when the server has no keys


class Keys:
    """The accepted bearer tokens; each maps to an owner tag (16 hex digits of its SHA-256)."""

    def __init__(self, keys: Iterable[str]) -> None:
        self.keys = tuple(keys)
        for k in self.keys:
            if not isinstance(k, str) or not k.strip() or k != k.strip():
                raise ValueError("an API key must be a non-empty string without surrounding whitespace")
        self._tags = [(k.encode(), owner_tag(k)) for k in self.keys]

    def __bool__(self) -> bool:
        return bool(self.keys)

    def owner_of(self, token: str) -> str | None:
        """The token's owner tag, or None if it is no key (constant time in the token per key)."""
        found = None
        for key, tag in self._tags:
            if hmac.compare_digest(token.encode(), key):
                found = tag
        return found


def owner_tag(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def scoped_id(owner: str, session_id: str) -> str:
    """The manager's id of `session_id` for `owner`. Raises ValueError on a malformed id."""
    if not isinstance(session_id, str) or not SESSION_ID_RE.fullmatch(session_id):
        raise ValueError(f"session_id must be 1-128 characters of letters, digits, '_', '-', '.', starting "
                         f"with a letter or digit; got {session_id!r}")
    return f"{owner}~{session_id}" if owner else session_id


def read_keys_file(path: str | Path) -> list[str]:
    """One key per line; blank lines and lines starting with '#' are skipped."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"--api-keys-file {str(p)!r} is not a file; give a file with one API key per line")
    keys = [ln.strip() for ln in p.read_text().splitlines()]
    keys = [k for k in keys if k and not k.startswith("#")]
    if not keys:
        raise ValueError(f"--api-keys-file {str(p)!r} holds no key; write one API key per line")
    return keys
