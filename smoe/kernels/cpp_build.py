"""The C++ kernels (every ``*.cpp`` beside this file) as one library, compiled on first use with
``torch.utils.cpp_extension`` (a C++ compiler and ninja, which the ``ninja`` dependency provides; a few seconds to a
minute once, then loaded from torch's extension cache). Each source registers its own ops (``torch.ops.smoe_quant``,
``torch.ops.smoe_experts``); the module beside it (cpp_quant.py, cpp_experts.py) adds their shapes for tracing
(through ``ops_builder``) and the Python entry points; ``row_offsets`` is the offsets both take.

``build()`` returns None when the library is loaded, or says why it cannot be (no compiler or ninja, a failed
build, another process's build outlasting ``BUILD_WAIT_SECONDS``); then each caller falls back to its Python
kernels, with a warning saying why (smoe.kernels).

The build directory is named by the sources, the instruction set, and the interpreter and torch install that load
the library (two environments on one machine each keep their own), and builds into it take turns under an
``fcntl`` lock, which the kernel releases when its holder dies however it dies: a build killed halfway (SIGKILL
while compiling) never blocks the next one. The lock file holds its holder's pid, which a wait that runs out
names.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import torch

SOURCES = sorted(Path(__file__).parent.glob("*.cpp"))


# Compiler flags per instruction set. torch's capability AVX512 means AVX-512 F, BW, VL and DQ with FMA, AVX2 means
# AVX2 with FMA; below that the portable loops run.
ISA_FLAGS = {"avx512": ["-mavx2", "-mfma", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq"],
             "avx2": ["-mavx2", "-mfma"], "portable": []}


def instruction_set() -> str:
    """The instruction set the library is built for: torch's CPU capability, which ``ATEN_CPU_CAPABILITY=avx2``
    (or ``default``: the portable loops) lowers for torch and these kernels alike."""
    return {"AVX512": "avx512", "AVX2": "avx2"}.get(torch.backends.cpu.get_cpu_capability(), "portable")


@functools.cache
def build() -> str | None:
    """Compile (or load the cached build of) the library for this CPU; None when it is loaded, else the reason it
    is not. AVX2 builds get the vector tiles (256 bits wide), AVX-512 builds those with a 512-bit int8 tile; any
    other CPU the portable loops."""
    from torch.utils import cpp_extension

    isa = instruction_set()
    # No contraction of the scalar maths into FMAs, which the compiler would choose per tile shape: every quantised
    # tile then computes a row bitwise alike, so a row's result never depends on the rows beside it (row_independent).
    flags = ["-O3", "-ffp-contract=off", "-fopenmp", *ISA_FLAGS[isa]]
    try:
        name = library_name(isa)
        directory = build_root() / name
        directory.mkdir(parents=True, exist_ok=True)
        with build_lock(directory), _ninja_on_path():
            cpp_extension.load(name, [str(s) for s in SOURCES], extra_cflags=flags, extra_ldflags=["-fopenmp"],
                               build_directory=str(directory), is_python_module=False)
    # No source, compiler or ninja; the build failed (torch raises RuntimeError, a compiler probe it runs itself
    # CalledProcessError) or timed out.
    except (OSError, RuntimeError, ImportError, subprocess.SubprocessError) as err:
        lines = str(err).strip().splitlines() or [repr(err)]
        # A failed build's first line is the compiler's command; the line that says what went wrong comes later.
        cause = next((line.strip() for line in lines[1:] if "error:" in line), None)
        return f"{type(err).__name__}: {lines[0][:200]}" + (f" ... {cause}" if cause else "")
    return None


def library_name(isa: str) -> str:
    """The library's name, and its build directory's: a hash of the sources (checkouts of different versions never
    rebuild or replace each other's library) and of the interpreter and the torch install that load it (nor do two
    environments on one machine, which torch's own naming, by Python and CUDA version, would let share one)."""
    digest = hashlib.sha1()
    for source in SOURCES:
        digest.update(source.name.encode() + source.read_bytes())
    digest.update(f"{sys.prefix}|{sys.version}|{Path(torch.__file__).parent}|{torch.__version__}".encode())
    return f"smoe_kernels_{isa}_{digest.hexdigest()[:10]}"


def build_root() -> Path:
    """Where the build directories go: ``TORCH_EXTENSIONS_DIR`` if set, else torch's extension cache."""
    from torch.utils import cpp_extension

    return Path(os.environ.get("TORCH_EXTENSIONS_DIR") or cpp_extension.get_default_build_root())


def ops_builder(register_shapes: Callable[[], None]) -> Callable[[], str | None]:
    """The ``build()`` of one source's ops: compiles (or loads) the library once, then registers those ops' shapes
    for tracing once; it returns None when they are ready, else why they are not. torch.compile calls it while
    tracing, as a constant, instead of tracing into the build."""

    @functools.cache
    def once() -> str | None:
        if (reason := build()) is None:
            register_shapes()
        return reason

    @torch.compiler.assume_constant_result
    def ready() -> str | None:
        return once()

    return ready


@contextlib.contextmanager
def _ninja_on_path():
    """PATH with the ``ninja`` package's binary for the duration of a build, when no other ninja is on it: the
    package installs it into the environment's bin directory, which is on PATH only once the environment is
    activated (``.venv/bin/python`` alone does not)."""
    before = os.environ.get("PATH")
    if shutil.which("ninja") is None:
        try:
            import ninja
        except ImportError:
            pass
        else:
            os.environ["PATH"] = os.pathsep.join(p for p in (ninja.BIN_DIR, before) if p)
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("PATH", None)
        else:
            os.environ["PATH"] = before


def row_offsets(counts_E: torch.Tensor) -> torch.Tensor:
    """The (E + 1,) int64 CPU row offsets the ops take for rows sorted by expert: expert e owns rows
    offs[e] to offs[e + 1]."""
    offs_E1 = torch.zeros(counts_E.shape[0] + 1, dtype=torch.int64)
    torch.cumsum(counts_E.cpu(), 0, out=offs_E1[1:])
    return offs_E1


# A build takes seconds to a minute on two cores; a wait for another process's build gives up after this long.
BUILD_WAIT_SECONDS = 600.0


@contextlib.contextmanager
def build_lock(directory: Path, wait: float | None = None):
    """Hold the build lock of ``directory`` (waiting ``wait`` seconds at most, default ``BUILD_WAIT_SECONDS``, for
    another process's build to end; TimeoutError naming its pid after that). Inside it, torch's own lock file is a
    leftover of a build that was killed, since every build of this directory holds ours: it is removed, or torch
    would wait for it forever."""
    import fcntl

    wait = BUILD_WAIT_SECONDS if wait is None else wait
    path = directory / "smoe.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
                    raise TimeoutError(f"{path}: process {holder} has been building the C++ kernels for more than "
                                       f"{wait:.0f} s; waited for it in vain") from None
                time.sleep(0.1)
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        (directory / "lock").unlink(missing_ok=True)  # torch's FileBaton, left by a build that was killed
        try:
            yield
        finally:
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
