"""The error types that mean "the input is wrong", as opposed to a fault of the machine.

A ``UserError`` (a bad config value, a data file that is not what it should be, a checkpoint that
cannot be read, a path that cannot be used) fails the same way on every attempt, so it is never
retried: the driver checks what it can before Ray starts, and one raised inside a Ray Train worker
stops the run at once (``sp_ray.train.failures``). ``sp-ray`` prints it as one line and exits 2.
This module imports nothing from sp_ray, so every layer can raise these.
"""

from __future__ import annotations

from collections.abc import Iterator


class UserError(ValueError):
    """Bad input of the user's; the message names the thing and says what to do."""


class NonFiniteLossError(UserError, FloatingPointError):
    """A training loss is not finite: the same settings give it again on a retry (lower the rate)."""


class EvaluationError(UserError):
    """Training finished, but evaluating the trained model failed; the message names its checkpoint.

    Not retried either: the model is saved, and training it again would not make the data evaluable.
    """


def causes(error: BaseException) -> Iterator[BaseException]:
    """``error`` and every exception it wraps: ``__cause__`` / ``__context__`` and the wrappers of Ray Train
    (``controller_failure`` of a ControllerError, ``worker_failures`` of a WorkerGroupError, ``_base_exc`` of
    the per-worker UserExceptionWithTraceback), depth first, each once."""
    seen: set[int] = set()
    stack = [error]
    while stack:
        current = stack.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        wrapped = [getattr(current, "_base_exc", None), getattr(current, "controller_failure", None)]
        failures = getattr(current, "worker_failures", None)
        if isinstance(failures, dict):
            wrapped.extend(failures[rank] for rank in sorted(failures, reverse=True))
        wrapped.extend([current.__context__, current.__cause__])
        stack.extend(e for e in wrapped if isinstance(e, BaseException))


def find_user_error(error: BaseException) -> UserError | None:
    """The first ``UserError`` among ``causes(error)`` (lowest worker rank first), or None."""
    return next((e for e in causes(error) if isinstance(e, UserError)), None)
