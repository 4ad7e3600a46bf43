"""Small helpers the demo maker's modules share: checking a named choice, writing JSON,
serializing writers with a file lock, and where caches live."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any


def check_choice(what: str, value: str, choices: Sequence[str] | dict[str, Any]) -> None:
    if value not in choices:
        raise ValueError(f"unknown {what} {value!r}; choose from {', '.join(choices)}")


def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def cache_root() -> Path:
    """Where the demos are cached: `<repo>/.cache` in a source checkout (the editable
    install used for development, already git-ignored), else `~/.cache/lorapool`."""
    repo = Path(__file__).resolve().parent.parent
    if (repo / "pyproject.toml").is_file() and (repo / "demo" / "maker.py").is_file():
        return repo / ".cache"
    return Path.home() / ".cache" / "lorapool"


def env_dir(variable: str, default: Path) -> Path:
    """The directory an environment variable names, else `default`."""
    value = os.environ.get(variable)
    return Path(value).expanduser() if value else default


@contextlib.contextmanager
def locked(lock_path: Path) -> Iterator[None]:
    """Hold an exclusive lock on `lock_path` (created if missing): concurrent writers
    (parallel test workers, two servers starting) wait for one another."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
