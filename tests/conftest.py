"""Fixtures shared by every test folder."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def local_ray():
    """A fresh single-machine Ray of 2 CPUs for the module's tests, unless one is running in this process already.

    ``address="local"`` starts a new instance: a test never joins a cluster that another process started here.
    """
    import ray  # a pinned dependency: missing, it is an install error, not a skip

    started = not ray.is_initialized()
    if started:
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    if started:
        ray.shutdown()


@pytest.fixture
def one_thread():
    """One torch thread for the test: on a shared 2-core machine, intra-op threads spinning against other
    processes slow the small training loops down by orders of magnitude."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
