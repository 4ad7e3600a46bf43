"""Progress bars where a user waits (the model loading, adapter downloads,
`lorapool bench`), shown only where someone watches: on stderr when it is a
terminal, or when asked for. LORAPOOL_PROGRESS=1 turns them on (e.g. under a
process manager that shows output live), LORAPOOL_PROGRESS=0 off; an explicit
flag (bench's --progress / --no-progress) wins over both. Logs, pipes and tests
get no bar noise.

tqdm draws the bars. It comes with the server's dependencies; a client-only
install without it shows no bar, and nothing else changes."""

from __future__ import annotations

import os
import sys
from typing import Any, TextIO

ENV = "LORAPOOL_PROGRESS"
_ON = {"1", "true", "yes", "on"}
_OFF = {"0", "false", "no", "off"}


def wanted(flag: bool | None = None, stream: TextIO | None = None) -> bool:
    """Whether to draw a bar on `stream` (default stderr): `flag` when given, else
    LORAPOOL_PROGRESS when it says on or off, else whether the stream is a terminal."""
    if flag is not None:
        return flag
    setting = os.environ.get(ENV, "").strip().lower()
    if setting in _ON:
        return True
    if setting in _OFF:
        return False
    isatty = getattr(stream or sys.stderr, "isatty", None)
    try:
        return bool(isatty and isatty())
    except ValueError:  # a closed stream
        return False


class NoBar:
    """The bar's interface, drawing nothing."""

    n = 0

    def update(self, n: float = 1) -> None:
        self.n += n

    def set_postfix_str(self, text: str = "", refresh: bool = True) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self) -> NoBar:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def bar(
    total: float | None,
    desc: str,
    unit: str,
    flag: bool | None = None,
    stream: TextIO | None = None,
    **options: Any,
) -> Any:
    """A tqdm bar on `stream` (default stderr) when `wanted(flag, stream)`, else a
    NoBar. Use it as a context manager, or close it."""
    if not wanted(flag, stream):
        return NoBar()
    try:
        from tqdm import tqdm
    except ImportError:
        return NoBar()
    return tqdm(
        total=total, desc=desc, unit=unit, file=stream or sys.stderr, dynamic_ncols=True, **options
    )
