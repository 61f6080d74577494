import os

import pytest
import torch

# Without a GPU, Triton kernels run in Triton's CPU interpreter; it reads this variable when triton is imported,
# which happens when smoe.kernels is (so before any test module).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module of tiny models: decoding them is a chain of small matmuls a second thread cannot
    speed up, and on a shared CPU its OpenMP barriers wait for a time slice (6 s instead of 0.15 s for one 16-token
    generate, measured). A module opts in with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pytest_collection_modifyitems(items):
    """Every test on the live server (test_serve's ``server`` fixture, started once per module in about 20 s) is
    slow, so `make test-fast` leaves it out."""
    for item in items:
        if "server" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)
