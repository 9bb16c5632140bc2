"""The set-criterion skeleton every query family's criterion fills in: stages, matching, normalisation, naming.

A set criterion (DETR, Carion et al. 2020, section 3.1) matches the predictions of each supervised stage
one-to-one to the targets (eq. 1, ``sp_ray.objectives.matcher.hungarian_match``) and sums per-pair losses over
the matches (eq. 2), with deep supervision of every decoder stage. ``SetCriterion.forward`` owns what the
families share:

- the loop over the stages [initial prediction (K-Net, Mask2Former; not QueryInst), aux stages..., final],
  numbered from ``first_stage``;
- the normaliser: a positive count (matched pairs, or target masks) averaged over the torch.distributed
  workers and clamped at 1 (DETR's ``num_boxes``), computed once and shared by every stage;
- the loss names ``loss_<name>_s<stage>``, in the order the family's per-stage terms come;
- ``return_matches=True``: also the matches of stages [0, 1, ..., S], stage 0 with no pairs where the
  family does not supervise its initial prediction (SP pre-training indexes them by stage);
- ``matches=``: losses under a given assignment instead of the matcher's (IUQ's equivariance term supervises
  a transformed view under the assignment of the original view);
- ``mask_terms``: the names of the family's mask losses among its per-stage terms.

A family supplies ``_prepare`` (validate and convert the targets, list the stages), ``_match`` (one stage's
matches), ``_stage_losses`` (one stage's weighted terms) and, where they differ from the defaults,
``_stage_inputs``, ``_positive_count`` and ``_matched``.
"""

from __future__ import annotations

import abc
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from sp_ray.objectives.matcher import Matches

Stage = Any  # a family's view of one stage's predictions (a dict of tensors)


def mean_over_workers(value: Tensor) -> Tensor:
    """Average a scalar over the torch.distributed workers, when there are several.

    Args:
        value: float scalar, this worker's value.

    Returns:
        float scalar: sum over the W workers / W (``value`` itself, not a copy, when W = 1).
    """
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        value = value.clone()
        dist.all_reduce(value)
        value = value / dist.get_world_size()
    return value


class SetCriterion(nn.Module, metaclass=abc.ABCMeta):
    """Base of the set criteria: the stage loop, the normaliser, the loss names and ``return_matches``.

    ``forward(outputs, targets)`` runs, in this order:

    1. ``stages, targets, device = self._prepare(outputs, targets)``;
    2. for the stages i = ``first_stage``, ``first_stage`` + 1, ...: ``stage = self._stage_inputs(i, raw)``,
       then ``matches_i = self._match(i, stage, previous_stage, previous_matches, targets)`` (with
       ``match_ahead``, every stage is matched first and ``stages = self._matched(stages, targets, matches)``
       runs before any loss);
    3. after the first stage's matching, ``num_pos = max(1, mean over workers of self._positive_count(targets,
       matches_first))``;
    4. ``self._stage_losses(i, stage, targets, matches_i, num_pos)`` -> {name: weighted term}, stored as
       ``loss_<name>_s<i>``.

    Attributes:
        first_stage: the number of the first supervised stage: 0 when the initial prediction (before the first
            decoder stage) is supervised, 1 otherwise.
        match_ahead: match every stage before computing any loss (for a family whose losses need every
            stage's matches); False matches and supervises stage by stage, so that random draws of the
            matching and of the losses interleave stage by stage.
        mask_terms: the names (without ``loss_`` and the stage) of the per-stage terms that supervise masks.
    """

    first_stage: int = 0
    match_ahead: bool = False
    mask_terms: tuple[str, ...] = ("mask", "dice")

    def forward(
        self,
        outputs: Any,
        targets: list[Any],
        *,
        return_matches: bool = False,
        matches: list[Matches] | None = None,
    ) -> dict[str, Tensor] | tuple[dict[str, Tensor], list[Matches]]:
        """Match and compute the weighted losses of every supervised stage.

        Args:
            outputs: the model's outputs (``ModelOutputs`` or a family's subclass of it).
            targets: B ``Target`` dicts.
            return_matches: also return the matches.
            matches: None, or the assignment to use instead of matching: a list over [stage 0, .., stage S]
                of B pairs (pred_idx, tgt_idx) int64, as ``return_matches`` gives them (the entries of the
                stages before ``first_stage`` are ignored).

        Returns:
            The losses ``loss_<name>_s<i>``, float scalars already multiplied by their weights, stage by stage
            in the order of each stage's terms. With ``return_matches``, also the matches: a list over
            [stage 0, stage 1, .., stage S] of B pairs (pred_idx, tgt_idx) int64 (no pairs for the stages before
            ``first_stage``).

        Raises:
            ValueError: ``matches`` does not have one entry of B pairs per stage.
        """
        raw_stages, tgts, device = self._prepare(outputs, targets)
        if matches is not None:
            self._check_given_matches(matches, self.first_stage + len(raw_stages), len(tgts))
        losses: dict[str, Tensor] = {}
        stages: list[Stage] = []
        all_matches: list[Matches] = []
        num_pos: Tensor | None = None
        for i, raw in enumerate(raw_stages, start=self.first_stage):
            stage = self._stage_inputs(i, raw)
            previous = (stages[-1], all_matches[-1]) if stages else (None, None)
            stage_matches = self._match(i, stage, *previous, tgts) if matches is None else matches[i]
            if num_pos is None:
                num_pos = self.normaliser(self._positive_count(tgts, stage_matches), device)
            if not self.match_ahead:
                self._store(losses, i, self._stage_losses(i, stage, tgts, stage_matches, num_pos))
            stages.append(stage)
            all_matches.append(stage_matches)
        if self.match_ahead and num_pos is not None:
            stages = self._matched(stages, tgts, all_matches)
            for i, (stage, stage_matches) in enumerate(zip(stages, all_matches, strict=True), start=self.first_stage):
                self._store(losses, i, self._stage_losses(i, stage, tgts, stage_matches, num_pos))
        if not return_matches:
            return losses
        # Stages before the first supervised one get no pairs, so that entry i is stage i.
        empty = torch.zeros(0, dtype=torch.int64, device=device)
        unsupervised = [[(empty, empty) for _ in tgts] for _ in range(self.first_stage)]
        return losses, [*unsupervised, *all_matches]

    @staticmethod
    def normaliser(count: int, device: torch.device) -> Tensor:
        """The loss normaliser of a batch: max(1, mean over the workers of ``count``).

        Args:
            count: this worker's positive count (matched pairs, or target masks).
            device: where the result lives.

        Returns:
            float32 scalar >= 1, no gradient.
        """
        return mean_over_workers(torch.tensor(float(count), device=device)).clamp(min=1.0)

    @staticmethod
    def _check_given_matches(matches: list[Matches], num_stages: int, batch: int) -> None:
        if len(matches) != num_stages or any(len(stage) != batch for stage in matches):
            found = [len(stage) for stage in matches]
            raise ValueError(
                f"matches must hold {num_stages} stages of {batch} (pred_idx, tgt_idx) pairs each, as "
                f"return_matches=True gives them; got pair counts {found}"
            )

    @staticmethod
    def _store(losses: dict[str, Tensor], stage_index: int, terms: dict[str, Tensor]) -> None:
        for name, value in terms.items():
            losses[f"loss_{name}_s{stage_index}"] = value

    # The family's part.

    @abc.abstractmethod
    def _prepare(self, outputs: Any, targets: list[Any]) -> tuple[list[Stage], list[dict[str, Tensor]], torch.device]:
        """Validate the batch; return the stages in order, the targets in the family's form, and the device."""

    def _stage_inputs(self, stage_index: int, stage: Stage) -> Stage:
        """What matching and losses of one stage read (default: the stage as ``_prepare`` listed it)."""
        return stage

    @abc.abstractmethod
    def _match(
        self,
        stage_index: int,
        stage: Stage,
        previous: Stage | None,
        previous_matches: Matches | None,
        targets: list[dict[str, Tensor]],
    ) -> Matches:
        """The matches of one stage; ``previous`` and ``previous_matches`` are the stage before (None at the
        first)."""

    def _positive_count(self, targets: list[dict[str, Tensor]], matches: Matches) -> int:
        """The count the losses are normalised by: by default the matched pairs of the first stage (every
        stage has min(N, K) per image, so one count serves all stages)."""
        return sum(p.numel() for p, _ in matches)

    def _matched(
        self, stages: list[Stage], targets: list[dict[str, Tensor]], matches: list[Matches]
    ) -> list[Stage]:
        """With ``match_ahead``: called once every stage is matched, before the losses; returns the stages the
        losses read (default: ``stages``)."""
        return stages

    @abc.abstractmethod
    def _stage_losses(
        self,
        stage_index: int,
        stage: Stage,
        targets: list[dict[str, Tensor]],
        matches: Matches,
        num_pos: Tensor,
    ) -> dict[str, Tensor]:
        """The weighted loss terms of one stage, {name: float scalar}, named without ``loss_`` and the stage."""
