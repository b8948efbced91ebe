"""Provenance of a result: which code, which weights, which machine and which command produced it.

Every benchmark script stores `stamp(...)` in its result JSON under the key ``"provenance"``, so a
number quoted in the documentation can be traced back to the commit, the exact weights file
(SHA-256) and the hardware it was measured on.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import os
import platform
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SHIPPED_SEG = Path(__file__).resolve().parent / "weights" / "metaseg.pt"
SHIPPED_CLS = Path(__file__).resolve().parent / "weights" / "metacls.pt"


def sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    """SHA-256 of a file, as a hex string.

    Args:
        path: the file.
        chunk: read size in bytes.
    """
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _git(*args: str, cwd: Path = REPO) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=20, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def git_state(root: str | Path = REPO) -> tuple[str | None, bool | None]:
    """The checkout's HEAD commit and whether tracked files differ from it.

    Args:
        root: a folder inside the checkout.

    Returns:
        ``(commit, dirty)``; ``($METAAPP_COMMIT, None)`` when that is set: a copy of a checkout on
        another machine, whose own git metadata may be older than its files, is stamped with the
        commit its sender names; ``(None, None)`` when ``root`` is not inside a git checkout (an
        installed package) or git is missing.
    """
    if sent := os.environ.get("METAAPP_COMMIT"):
        return sent, None
    commit = _git("rev-parse", "HEAD", cwd=Path(root))
    if not commit:
        return None, None
    status = _git("status", "--porcelain", "--untracked-files=no", cwd=Path(root))
    return commit, bool(status)


def cpu_model() -> str:
    """The CPU's model name (from ``/proc/cpuinfo`` on Linux, else ``platform.processor()``)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def host() -> dict:
    """The machine a result is measured on: CPU model, cores, GPU (or None), torch version, memory."""
    info: dict = {"cpu": cpu_model(), "cores": os.cpu_count(), "gpu": None, "torch": None}
    try:
        import torch

        info["torch"] = torch.__version__
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name()
    except ImportError:
        pass
    try:
        pages, size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
        info["memory_gib"] = round(pages * size / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        pass
    return info


def stamp(weights: Iterable[str | Path] = (), command: list[str] | None = None) -> dict:
    """Provenance record to store in a result JSON under ``"provenance"``.

    Args:
        weights: weights files the result used; each is recorded with its SHA-256 (a missing file
            is recorded as None).
        command: the command line; default ``sys.argv`` (prefixed with ``python`` when it is a script).

    Returns:
        ``{"commit", "dirty", "weights": {path: sha256}, "host": {...}, "command", "date"}``; ``commit``
        and ``dirty`` are None outside a git checkout.
    """
    commit, dirty = git_state()
    argv = list(sys.argv if command is None else command)
    if command is None and argv and argv[0].endswith(".py"):
        argv = ["python", *argv]
    hashes = {}
    for w in weights:
        p = Path(w)
        hashes[str(w)] = sha256(p) if p.is_file() else None
    return {
        "commit": commit,
        "dirty": dirty,
        "weights": hashes,
        "host": host(),
        "command": " ".join(argv),
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
    }
