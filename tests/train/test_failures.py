"""Which worker failures end a Ray Train run at once: the wrappers Ray puts around a worker's exception."""

import pytest
from ray.train import ControllerError, WorkerGroupError
from ray.train.v2._internal.exceptions import UserExceptionWithTraceback

from sp_ray.config import ConfigError
from sp_ray.errors import EvaluationError, UserError, find_user_error
from sp_ray.train.failures import StopOnUserError, raise_user_error


def as_worker_error(error: BaseException) -> UserExceptionWithTraceback:
    """What the controller sees for an exception raised in a worker's training function."""
    return UserExceptionWithTraceback(error, traceback_str=f"Traceback ...\n{error}")


@pytest.mark.parametrize("error", [UserError("data.train_images /x does not exist"), ConfigError("train.lr is nan"),
                                   EvaluationError("the evaluation of epoch 2 failed")])
def test_a_user_error_in_any_worker_stops_the_run(error):
    with pytest.raises(type(error), match=str(error)):
        StopOnUserError().after_exception(None, {0: as_worker_error(RuntimeError("peer gone")),
                                                 1: as_worker_error(error)})


def test_faults_are_left_to_the_retry_policy():
    faults = {0: as_worker_error(RuntimeError("gloo: connection reset")), 1: as_worker_error(MemoryError())}
    StopOnUserError().after_exception(None, faults)  # returns: Ray's FailureConfig decides


def test_the_driver_gets_the_worker_message_back():
    inner = UserError("no usable training image in /data/train2017")
    raised = ControllerError(inner)  # the callback's exception, as TorchTrainer.fit raises it
    with pytest.raises(UserError, match="no usable training image") as caught:
        raise_user_error(raised)
    assert caught.value.__cause__ is None and caught.value.__suppress_context__
    group = WorkerGroupError("worker errors", {1: as_worker_error(ConfigError("model.depth is 19"))})
    assert isinstance(find_user_error(group), ConfigError)
    assert find_user_error(WorkerGroupError("worker errors", {0: as_worker_error(OSError("disk"))})) is None
    raise_user_error(RuntimeError("a fault"))  # nothing to re-raise
