"""The C kernels of a CPU, compiled on first use with the machine's C compiler and
called through ctypes: lora_kernels.c for the LoRA of short runs (decode rows),
which reads each adapter row once per run instead of once per token (lora.py),
attention_kernels.c for decode attention, which reads each KV block once for all
the query heads that share it (attention.py), and layer_kernels.c for a layer's
small ops (norms, rope, silu), one pass each (model.py).

The library is built once per source, compiler and CPU into a cache folder
(LORAPOOL_CACHE_DIR, else ~/.cache/lorapool), written under a temporary name and
renamed, so concurrent processes never load a half-written file. It is built with
OpenMP and loaded after torch, so it shares torch's OpenMP runtime (one thread
pool). Where there is no compiler, the build fails, or LORAPOOL_NATIVE=0, `load()`
returns None and the torch paths run instead: same results, slower."""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

log = logging.getLogger("lorapool.model")

SOURCES = [
    Path(__file__).with_name(n)
    for n in ("lora_kernels.c", "attention_kernels.c", "layer_kernels.c")
]
HEADERS = [Path(__file__).with_name("simd.h")]
FLAGS = ["-O3", "-march=native", "-ffp-contract=fast", "-fopenmp", "-shared", "-fPIC", "-std=c11"]

# Fields per run, as lora_kernels.c's enums number them.
SHRINK_FIELDS = 7  # start, n, g, bags, index pointer, layer stride, v offset
EXPAND_FIELDS = 8  # start, n, rank, modules, index pointer, layer stride, v offset, table

_lock = threading.Lock()
_loaded: list[NativeKernels | None] = []  # [] until the first load() decides


class NativeKernels:
    """The kernels, with argument types declared once."""

    def __init__(self, lib: ctypes.CDLL):
        p, i64 = ctypes.c_void_p, ctypes.c_int64
        self._shrink = lib.lora_shrink
        self._shrink.argtypes = [p, p, i64, i64, p, i64, i64, p]
        self._shrink.restype = None
        self._expand = lib.lora_expand
        self._expand.argtypes = [p, i64, p, i64, p, p, i64, i64]
        self._expand.restype = None
        self._attention = lib.decode_attention
        self._attention.argtypes = [p, i64, i64, p, i64, p, p, i64, p, i64, i64, i64, i64, i64]
        self._attention.argtypes += [i64, ctypes.c_float, p]
        self._attention.restype = None
        self._kv_write = lib.kv_write
        self._kv_write.argtypes = [p, i64, i64, p, i64, p, i64, p, p, i64, i64, i64, i64]
        self._kv_write.restype = None
        self._add_rms_norm = lib.add_rms_norm
        self._add_rms_norm.argtypes = [p, i64, p, i64, p, p, i64, i64, ctypes.c_float]
        self._add_rms_norm.restype = None
        self._rope = lib.rope
        self._rope.argtypes = [p, i64, i64, i64, i64, p, p, p]
        self._rope.restype = None
        self._silu_mul = lib.silu_mul
        self._silu_mul.argtypes = [p, i64, p, i64, i64]
        self._silu_mul.restype = None

    def shrink(self, pool, x, fan_in, runs, layer, v) -> None:
        self._shrink(
            pool.data_ptr(), x.data_ptr(), x.stride(0), fan_in,
            runs.data_ptr(), runs.shape[0], layer, v.data_ptr(),
        )  # fmt: skip

    def expand(self, pool, h, y, v, runs, layer) -> None:
        self._expand(
            pool.data_ptr(), h, y.data_ptr(), y.stride(0), v.data_ptr(),
            runs.data_ptr(), runs.shape[0], layer,
        )  # fmt: skip

    def decode_attention(
        self, pool, page_elems, layer_offset, q, out, tables, lens, kv_heads, block, window,
        scale, scores,
    ) -> None:  # fmt: skip
        """q: [rows, heads, head_dim] (rows may be strided), out: the same, contiguous;
        tables: int32 [rows, width] page ids; lens: int32 [rows] tokens cached; scores:
        scratch of rows * heads * width * block floats."""
        rows, heads, head_dim = q.shape
        self._attention(
            pool.data_ptr(), page_elems, layer_offset, q.data_ptr(), q.stride(0),
            out.data_ptr(), tables.data_ptr(), tables.shape[1], lens.data_ptr(), rows, heads,
            kv_heads, head_dim, block, window or 0, scale, scores.data_ptr(),
        )  # fmt: skip

    def kv_write(self, pool, page_elems, layer_offset, k, v, pages, offsets, block) -> None:
        """k, v: [tokens, kv heads, head_dim] (tokens may be strided); pages, offsets:
        int32 [tokens], each token's page and slot in it."""
        tokens, kv_heads, head_dim = k.shape
        self._kv_write(
            pool.data_ptr(), page_elems, layer_offset, k.data_ptr(), k.stride(0), v.data_ptr(),
            v.stride(0), pages.data_ptr(), offsets.data_ptr(), tokens, kv_heads, head_dim, block,
        )  # fmt: skip

    def add_rms_norm(self, x, residual, weight, eps) -> torch.Tensor:
        """x += residual (unless None), in place; returns rms_norm(x) * weight, new.
        x and residual: [rows, dim], rows may be strided."""
        rows, dim = x.shape
        out = torch.empty(rows, dim, dtype=x.dtype)
        self._add_rms_norm(
            x.data_ptr(), x.stride(0), residual.data_ptr() if residual is not None else None,
            residual.stride(0) if residual is not None else 0, weight.data_ptr(),
            out.data_ptr(), rows, dim, eps,
        )  # fmt: skip
        return out

    def rope(self, x, heads, head_dim, cos, sin, positions) -> None:
        """Rotates the first `heads` heads of each row of x ([rows, width], rows may
        be strided) in place; cos/sin: [positions, head_dim]; positions: int64."""
        self._rope(
            x.data_ptr(), x.stride(0), x.shape[0], heads, head_dim, cos.data_ptr(),
            sin.data_ptr(), positions.data_ptr(),
        )  # fmt: skip

    def silu_mul(self, gu) -> torch.Tensor:
        """silu(gate) * up of gu = [gate | up] ([rows, 2 * inter]), new."""
        rows, inter = gu.shape[0], gu.shape[1] // 2
        out = torch.empty(rows, inter, dtype=gu.dtype)
        self._silu_mul(gu.data_ptr(), gu.stride(0), out.data_ptr(), rows, inter)
        return out


def wanted(tensor: torch.Tensor) -> bool:
    """The kernels read float32 tensors (pools, activations) on the CPU."""
    return (
        tensor.device.type == "cpu"
        and tensor.dtype == torch.float32
        and os.environ.get("LORAPOOL_NATIVE", "1") != "0"
    )


def load() -> NativeKernels | None:
    """The compiled kernels, or None where they cannot be built (decided once)."""
    with _lock:
        if not _loaded:
            _loaded.append(_build_and_load())
        return _loaded[0]


def _build_and_load() -> NativeKernels | None:
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        log.info("no C compiler: the torch paths run instead of the C kernels")
        return None
    try:
        path = _library_path(compiler)
        if not path.exists():
            _compile(compiler, path)
        return NativeKernels(ctypes.CDLL(str(path)))
    except (OSError, subprocess.SubprocessError) as exc:
        log.warning("C kernels not built (%s): the torch paths run instead", exc)
        return None


def _library_path(compiler: str) -> Path:
    """Keyed on everything the binary depends on: source, flags, compiler, CPU."""
    key = hashlib.sha256()
    for source in SOURCES + HEADERS:
        key.update(source.read_bytes())
    key.update(" ".join(FLAGS).encode())
    version = subprocess.run([compiler, "--version"], capture_output=True, timeout=30).stdout
    key.update(version)
    key.update(platform.machine().encode())
    key.update(_cpu_flags().encode())
    root = Path(os.environ.get("LORAPOOL_CACHE_DIR") or Path.home() / ".cache" / "lorapool")
    return root / "native" / f"kernels-{key.hexdigest()[:16]}.so"


def _cpu_flags() -> str:
    """-march=native builds for this CPU: a cache shared with another CPU must not
    hand it this binary."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def _compile(compiler: str, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        out = Path(tmp) / path.name
        done = subprocess.run(
            [compiler, *FLAGS, *map(str, SOURCES), "-o", str(out), "-lm"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        if done.returncode != 0:
            raise OSError(f"{compiler} failed: {done.stderr.strip()[:500]}")
        os.replace(out, path)
    log.info("built %s", path)
