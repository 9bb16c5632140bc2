"""Which failures of a Ray Train run are retried: faults yes, the user's errors never.

``FailureConfig(max_failures)`` restarts the workers after any worker error, which is right for a lost
node or an OOM-killed process and wrong for a ``UserError`` (a bad value, file or checkpoint fails the
same way on every attempt). The driver checks what it can before Ray starts (``sp_ray.train.preflight``);
for what only a worker can find, ``StopOnUserError`` runs in the Ray Train controller and ends the run
at the first worker exception that is a ``UserError``: an exception raised by a controller callback is a
controller error, which Ray's failure policy does not retry. ``raise_user_error`` then gives the driver
the worker's own exception back.
"""

from __future__ import annotations

from typing import Any

from ray.train import UserCallback

from sp_ray.errors import find_user_error


class StopOnUserError(UserCallback):
    """A Ray Train callback (run in the controller): a ``UserError`` in any worker stops the run, unretried."""

    def after_exception(self, run_context: Any, worker_exceptions: dict[int, Exception]) -> None:
        for rank in sorted(worker_exceptions):
            found = find_user_error(worker_exceptions[rank])
            if found is not None:
                raise found


def raise_user_error(error: BaseException) -> None:
    """Re-raise the ``UserError`` that ``error`` (what ``TorchTrainer.fit`` raised) wraps, if there is one."""
    found = find_user_error(error)
    if found is not None:
        # The worker's own message is the whole story; Ray's wrappers would only repeat it with tracebacks.
        raise type(found)(*found.args) from None
