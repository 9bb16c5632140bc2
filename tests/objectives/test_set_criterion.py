"""The shared Hungarian loop (``hungarian_match``) and the set-criterion skeleton (``SetCriterion``)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor

from sp_ray.objectives.matcher import Matches, hungarian_match
from sp_ray.objectives.set_criterion import SetCriterion, mean_over_workers

CPU = torch.device("cpu")


# ---------------------------------------------------------------- hungarian_match


def test_hungarian_match_finds_the_optimum_where_greedy_fails() -> None:
    # Greedy takes the cheapest pair (0, 0) = 1 first and is left with (1, 1) = 10: total 11.
    # The optimum is (0, 1) + (1, 0) = 2 + 2 = 4.
    cost = torch.tensor([[1.0, 2.0], [2.0, 10.0]])
    [(pred_idx, tgt_idx)] = hungarian_match(lambda b: cost, [2], device=CPU)
    assert pred_idx.tolist() == [0, 1] and tgt_idx.tolist() == [1, 0]
    assert pred_idx.dtype == tgt_idx.dtype == torch.int64


def test_hungarian_match_more_predictions_or_more_targets() -> None:
    # 3 predictions, 2 targets: prediction 1 is the cheap one for both, the optimum gives target 0 to
    # prediction 2 (0 + 5 = 5 against 1 + 9 = 10 with prediction 1 on target 0).
    tall = torch.tensor([[9.0, 9.0], [1.0, 0.0], [5.0, 9.0]])
    # 2 predictions, 3 targets: (0, 1) + (1, 0) = 0 + 5 beats (0, 0) + (1, 1) = 1 + 9; target 2 stays unmatched.
    wide = torch.tensor([[1.0, 0.0, 50.0], [5.0, 9.0, 50.0]])
    (p0, t0), (p1, t1) = hungarian_match(lambda b: (tall, wide)[b], [2, 3], device=CPU)
    assert p0.tolist() == [1, 2] and t0.tolist() == [1, 0]
    assert p1.tolist() == [0, 1] and t1.tolist() == [1, 0]


def test_hungarian_match_skips_images_without_targets() -> None:
    asked: list[int] = []

    def cost(b: int) -> Tensor:
        asked.append(b)
        return torch.zeros(3, 1)

    (p0, t0), (p1, t1), (p2, t2) = hungarian_match(cost, [0, 1, 0], device=CPU)
    assert asked == [1]
    assert p0.numel() == t0.numel() == p2.numel() == 0 and p0.dtype == torch.int64
    assert p1.tolist() == [0] and t1.tolist() == [0]


def test_hungarian_match_costs_run_without_autocast() -> None:
    seen: list[bool] = []

    def cost(b: int) -> Tensor:
        seen.append(torch.is_autocast_enabled("cpu"))
        return torch.eye(2)

    with torch.autocast("cpu", dtype=torch.bfloat16):
        hungarian_match(cost, [2], device=CPU)
    assert seen == [False]


def test_hungarian_match_rejects_non_finite_costs_naming_the_image() -> None:
    costs = [torch.eye(2), torch.tensor([[0.0, float("nan")], [1.0, 0.0]])]
    with pytest.raises(ValueError, match="image 1"):
        hungarian_match(lambda b: costs[b], [2, 2], device=CPU)


# ---------------------------------------------------------------- SetCriterion


class _ToyCriterion(SetCriterion):
    """Stages are plain tensors of per-query scores [B, N]; targets {"labels": [K]}; the match of a stage is
    given by the test; one term "sum" = sum of the matched scores / num_pos, one term "count" = num_pos."""

    def __init__(self, matches: list[Matches], *, first_stage: int = 0, match_ahead: bool = False) -> None:
        super().__init__()
        self.first_stage = first_stage
        self.match_ahead = match_ahead
        self.given = matches
        self.log: list[str] = []

    def _prepare(self, outputs, targets):
        return list(outputs), [{"labels": torch.as_tensor(t)} for t in targets], CPU

    def _match(self, stage_index, stage, previous, previous_matches, targets):
        self.log.append(f"match{stage_index}")
        assert (previous is None) == (previous_matches is None) == (stage_index == self.first_stage)
        return self.given[stage_index - self.first_stage]

    def _matched(self, stages, targets, matches):
        self.log.append("matched")
        return stages

    def _stage_losses(self, stage_index, stage, targets, matches, num_pos):
        self.log.append(f"losses{stage_index}")
        total = sum(stage[b, p].sum() for b, (p, _) in enumerate(matches))
        return {"sum": total / num_pos, "count": num_pos}


def _pairs(*per_image: list[int]) -> Matches:
    return [(torch.tensor(p, dtype=torch.int64), torch.arange(len(p))) for p in per_image]


def test_set_criterion_names_and_normalises_every_stage() -> None:
    stage_a = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    stage_b = 10 * stage_a
    # Stage 0 matches 2 + 1 = 3 queries: the normaliser of every stage is 3.
    matches = [_pairs([0, 2], [1]), _pairs([1], [0, 2])]
    criterion = _ToyCriterion(matches)
    losses, got = criterion([stage_a, stage_b], [[0, 0], [0]], return_matches=True)
    assert list(losses) == ["loss_sum_s0", "loss_count_s0", "loss_sum_s1", "loss_count_s1"]
    assert losses["loss_sum_s0"].item() == pytest.approx((1 + 3 + 5) / 3)
    assert losses["loss_sum_s1"].item() == pytest.approx((20 + 40 + 60) / 3)
    assert losses["loss_count_s0"].item() == losses["loss_count_s1"].item() == 3.0
    assert got is not None and len(got) == 2 and got[1] is matches[1]
    assert criterion.log == ["match0", "losses0", "match1", "losses1"]  # stage by stage
    assert list(criterion([stage_a, stage_b], [[0, 0], [0]])) == list(losses)  # without return_matches


def test_set_criterion_clamps_the_normaliser_at_one() -> None:
    stage = torch.tensor([[2.0, 3.0]])
    losses = _ToyCriterion([_pairs([])])([stage], [[]])
    assert losses["loss_count_s0"].item() == 1.0 and losses["loss_sum_s0"].item() == 0.0


def test_set_criterion_from_stage_one_gives_an_empty_stage_zero_and_matches_ahead() -> None:
    stage = torch.tensor([[1.0, 2.0]])
    matches = [_pairs([1]), _pairs([0])]
    criterion = _ToyCriterion(matches, first_stage=1, match_ahead=True)
    losses, got = criterion([stage, stage], [[0]], return_matches=True)
    assert list(losses) == ["loss_sum_s1", "loss_count_s1", "loss_sum_s2", "loss_count_s2"]
    assert [losses["loss_sum_s1"].item(), losses["loss_sum_s2"].item()] == [2.0, 1.0]
    assert len(got) == 3 and got[1:] == matches
    assert len(got[0]) == 1 and got[0][0][0].numel() == got[0][0][1].numel() == 0
    assert criterion.log == ["match1", "match2", "matched", "losses1", "losses2"]


def test_set_criterion_with_given_matches_never_matches() -> None:
    stage = torch.tensor([[1.0, 2.0, 3.0]])
    criterion = _ToyCriterion([_pairs([0]), _pairs([0])], first_stage=1, match_ahead=True)
    # [stage 0 (unsupervised, ignored), stage 1, stage 2], as return_matches gives them.
    given = [_pairs([]), _pairs([2]), _pairs([1, 2])]
    losses, got = criterion([stage, stage], [[0, 0]], return_matches=True, matches=given)
    assert criterion.log == ["matched", "losses1", "losses2"]  # no match call
    # The normaliser is stage 1's pair count: 1.
    assert [losses["loss_sum_s1"].item(), losses["loss_sum_s2"].item()] == [3.0, 5.0]
    assert got[1:] == given[1:]
    with pytest.raises(ValueError, match="3 stages of 1"):
        criterion([stage, stage], [[0, 0]], matches=given[1:])


def _two_workers(rank: int, init_file: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        counts = (3, 0)  # worker 0 matched 3 queries, worker 1 none: both normalise by (3 + 0) / 2 = 1.5
        normaliser = SetCriterion.normaliser(counts[rank], CPU)
        mean = mean_over_workers(torch.tensor(rank * 4.0))
        torch.save({"normaliser": normaliser, "mean": mean}, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_normaliser_averages_over_workers(tmp_path: Path) -> None:
    mp.spawn(_two_workers, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    for rank in (0, 1):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert got["normaliser"].item() == 1.5
        assert got["mean"].item() == 2.0  # (0 + 4) / 2


def test_normaliser_alone_is_the_clamped_count() -> None:
    assert SetCriterion.normaliser(5, CPU).item() == 5.0
    assert SetCriterion.normaliser(0, CPU).item() == 1.0
    value = torch.tensor(7.0)
    assert mean_over_workers(value) is value  # a single worker: unchanged
