"""The registry's expert backends as test parameters, so that the parity tests cover every registered backend and
a new one joins them by registering (tests/test_backends.py, tests/test_quant.py).

A backend with compiled kernels (``Backend.build``) has its tests marked ``compiled``: the lower-instruction-set
builds rerun exactly those (tests/test_backends.py). Where a C++ toolchain is present, a failed build is a failure,
not a skip: its tests run and fail naming the compiler's error."""

from __future__ import annotations

import importlib.util
import os
import shutil

import pytest
import torch

from smoe import kernels
from smoe.kernels.registry import find

CPU = torch.device("cpu")


def missing_toolchain() -> str | None:
    """Why a C++ build cannot be expected here (no compiler or no ninja), or None."""
    compiler = os.environ.get("CXX", "c++")  # what torch.utils.cpp_extension runs
    if shutil.which(compiler) is None:
        return f"no C++ compiler ({compiler}) on PATH"
    if shutil.which("ninja") is None and importlib.util.find_spec("ninja") is None:
        return "no ninja"
    return None


def marks(backend: kernels.Backend, lower_builds: bool = True) -> list:
    """``compiled`` for a backend with compiled kernels (unless ``lower_builds`` is False: a test that does not
    depend on the instruction set they are built for), and a skip, naming why, for one that cannot run on the CPU
    unless the only reason is a failed build where a toolchain is present."""
    found = [pytest.mark.compiled] if backend.build is not None and lower_builds else []
    reason = backend.unavailable(CPU)
    build_failed = backend.runs_on(CPU) is None and backend.build is not None and backend.build() is not None
    cannot_run = reason is not None and not (build_failed and missing_toolchain() is None)
    return [*found, pytest.mark.skipif(cannot_run, reason=reason or f"{backend.name} runs on this CPU")]


def params(kind: str, where=lambda entry: True, spec: bool = False) -> list:
    """One parameter per registered backend whose ``kind`` kernels ("floating" or "quantized") ``where`` accepts,
    its name the id; the reference, the spec the others are checked against, only with ``spec``."""
    return [pytest.param(b, id=b.name, marks=marks(b)) for b in kernels.backends()
            if getattr(b, kind) is not None and where(getattr(b, kind)) and (spec or b.name != "reference")]


def compiled_params() -> list:
    """One parameter per registered backend with compiled kernels."""
    return [pytest.param(b, id=b.name, marks=marks(b)) for b in kernels.backends() if b.build is not None]


def of(name: str, lower_builds: bool = True):
    """Decorator: the marks of the registered backend ``name``, for a test of its own ops."""
    backend = find(name)
    assert backend is not None, f"no backend {name!r} is registered"

    def decorate(test):
        for mark in marks(backend, lower_builds):
            test = mark(test)
        return test

    return decorate
