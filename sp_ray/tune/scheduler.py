"""Early stopping of weak trials, fraction by fraction.

AP on 1% of the labels and AP on 10% live on different scales, so one ASHA over every trial would stop
the small-fraction trials for being small-fraction trials. ``FractionASHA`` keeps one
``AsyncHyperBandScheduler`` per labeled fraction and hands each trial to its fraction's.
"""

from __future__ import annotations

from typing import Any

from ray.tune.experiment import Trial
from ray.tune.schedulers import AsyncHyperBandScheduler, FIFOScheduler

from sp_ray.tune.space import FRACTION


class FractionASHA(FIFOScheduler):
    """Asynchronous successive halving (Li et al. 2020) within each value of ``config["fraction"]``.

    Args:
        time_attr: the reported, monotonic progress key (``epoch``: a trial restarted by ``--resume``
            continues its Train run, so its epochs stay comparable where Tune's iteration count restarts).
        max_t: the last rung, in ``time_attr`` units.
        grace_period: ``time_attr`` units before a trial may be stopped.
        reduction_factor: each rung keeps the best 1 / reduction_factor of the trials that reach it.
    """

    def __init__(self, *, time_attr: str, max_t: int, grace_period: int, reduction_factor: float) -> None:
        super().__init__()
        # Trials that reach max_t finish on their own: stopping them there would cut their final checkpoint.
        self._options = {"time_attr": time_attr, "max_t": max_t, "grace_period": min(grace_period, max_t),
                         "reduction_factor": reduction_factor, "stop_last_trials": False}
        self._mode: str | None = None
        self._by_fraction: dict[float, AsyncHyperBandScheduler] = {}

    def set_search_properties(self, metric: str | None, mode: str | None, **spec: Any) -> bool:
        if (self._metric and metric) or (self._mode and mode):
            return False
        self._metric, self._mode = metric or self._metric, mode or self._mode
        return True

    def _for(self, trial: Trial) -> AsyncHyperBandScheduler:
        fraction = trial.config[FRACTION]
        if fraction not in self._by_fraction:
            self._by_fraction[fraction] = AsyncHyperBandScheduler(
                metric=self._metric, mode=self._mode, **self._options
            )
        return self._by_fraction[fraction]

    def on_trial_add(self, tune_controller: Any, trial: Trial) -> None:
        self._for(trial).on_trial_add(tune_controller, trial)

    def on_trial_result(self, tune_controller: Any, trial: Trial, result: dict) -> str:
        return self._for(trial).on_trial_result(tune_controller, trial, result)

    def on_trial_complete(self, tune_controller: Any, trial: Trial, result: dict) -> None:
        self._for(trial).on_trial_complete(tune_controller, trial, result)

    def on_trial_remove(self, tune_controller: Any, trial: Trial) -> None:
        self._for(trial).on_trial_remove(tune_controller, trial)

    def debug_string(self) -> str:
        return "\n".join(f"fraction {fraction:g}: {scheduler.debug_string()}"
                         for fraction, scheduler in sorted(self._by_fraction.items()))
