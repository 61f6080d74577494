import os

import pytest
import torch

# Without a GPU, Triton kernels run in Triton's CPU interpreter; it reads this variable when triton is imported,
# which happens when smoe.kernels is (so before any test module).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(items):
    """Every test on the live server (test_serve's ``server`` fixture, started once per module in about 20 s) is
    slow, so `make test-fast` leaves it out."""
    for item in items:
        if "server" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)
