"""Fixtures of the training tests."""

from __future__ import annotations

import pytest

from sp_ray.train.session import LocalSession


class StopAtStep(LocalSession):
    """A process that dies at one global step, as a killed worker or a stopped driver would."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step(self, step: int) -> None:
        if step == self.step:
            raise RuntimeError(f"stopped at step {step}")


@pytest.fixture
def stop_at_step() -> type[StopAtStep]:
    """``stop_at_step(n)``: a local session whose process dies at global step ``n``."""
    return StopAtStep
