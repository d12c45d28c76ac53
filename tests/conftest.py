"""Session-wide test setup.

Without a GPU, Triton kernels run under its interpreter, which must be chosen before triton is first
imported anywhere (bitsandbytes, pulled in by galore-torch, imports it too), so it is set here."""
import importlib
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def in_ci() -> bool:
    """True in CI (the environment variable CI is "true"), where requirements/ci.txt is installed."""
    return os.environ.get("CI") == "true"


def require(module_name: str):
    """Import and return a test-only dependency (galore_torch, bitsandbytes, transformers, triton, matplotlib,
    apollo_torch, peft: what requirements/ci.txt installs). Where it is missing the test is skipped on a
    developer's machine, but fails in CI (CI=true): there a missing dependency is a broken setup, and a
    skipped equivalence test would pass without checking anything. Works in a test and at module level."""
    try:
        return importlib.import_module(module_name)
    except ImportError as exc:
        msg = f"test dependency {module_name!r} cannot be imported ({exc})"
        if in_ci():
            pytest.fail(f"{msg}; CI installs requirements/ci.txt, so this is a broken CI setup, not a skip",
                        pytrace=False)
        pytest.skip(f"{msg}; pip install -r requirements/ci.txt", allow_module_level=True)


@pytest.fixture(scope="module")
def one_thread():
    """Small LAPACK calls (the refreshes' SVD and QR on tiny weights) are fastest on one thread; on a CPU
    shared with other jobs, OpenMP barriers in multi-threaded LAPACK cost up to a second per call (measured:
    test_every_policy_trains 1.9 s on one thread, 23 s on two under load). Results do not depend on it.
    Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
