"""Kernel supervision L_ker (SP, METHODS.md 1.3) and its collapse guard."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sp_ray.pretrain.kernel_loss import SaliencyProjection, angle_preservation_loss, kernel_supervision_loss

C = D = 8


def _identity_projection() -> nn.Linear:
    linear = nn.Linear(C, D, bias=False)
    with torch.no_grad():
        linear.weight.copy_(torch.eye(D))
    return linear


def _match(pred: list[int], tgt: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.tensor(pred, dtype=torch.int64), torch.tensor(tgt, dtype=torch.int64)


def test_zero_for_aligned_and_two_for_opposite_kernels():
    queries = torch.randn(3, C)
    matches = [[_match([0, 1, 2], [0, 1, 2])]]
    aligned = kernel_supervision_loss([queries[None] * 2.5], [queries], matches, _identity_projection())
    opposite = kernel_supervision_loss([-queries[None]], [queries], matches, _identity_projection())
    assert set(aligned) == {"loss_ker_s1"}
    torch.testing.assert_close(aligned["loss_ker_s1"], torch.tensor(0.0), atol=1e-6, rtol=0)
    torch.testing.assert_close(opposite["loss_ker_s1"], torch.tensor(2.0), atol=1e-6, rtol=0)


def test_pairs_by_the_matcher_indices_not_by_ground_truth_order():
    queries = F.normalize(torch.randn(2, C), dim=1)
    kernels = torch.randn(1, 4, D)
    kernels[0, 2] = queries[0]  # kernel 2 was matched to pseudo mask 0
    kernels[0, 0] = queries[1]  # kernel 0 to pseudo mask 1
    matches = [[_match([2, 0], [0, 1])]]  # the matcher's pairs; pred order differs from mask order
    loss = kernel_supervision_loss([kernels], [queries], matches, _identity_projection())["loss_ker_s1"]
    torch.testing.assert_close(loss, torch.tensor(0.0), atol=1e-6, rtol=0)
    # The reference's pairing (kernels in ascending index order, masks in ground-truth order) is wrong here.
    reference = (1 - F.cosine_similarity(kernels[0, [0, 2]], queries, dim=1)).mean()
    assert reference > 0.1


def test_batched_pairs_index_each_images_own_queries_and_stages_are_separate():
    q0, q1 = torch.randn(2, C), torch.randn(3, C)
    k = torch.randn(2, 5, D)
    k[0, 4], k[1, 1], k[1, 3] = q0[1], q1[2], q1[0]
    stage1 = [_match([4], [1]), _match([1, 3], [2, 0])]
    stage2 = [_match([0], [0]), _match([], [])]
    losses = kernel_supervision_loss([k, -k], [q0, q1], [stage1, stage2], _identity_projection(), weight=0.5)
    assert set(losses) == {"loss_ker_s1", "loss_ker_s2"}
    torch.testing.assert_close(losses["loss_ker_s1"], torch.tensor(0.0), atol=1e-6, rtol=0)
    expected = 0.5 * (1 - F.cosine_similarity(-k[0, 0], q0[0], dim=0))
    torch.testing.assert_close(losses["loss_ker_s2"], expected)


def test_no_matches_gives_zero_attached_to_the_graph():
    kernels = torch.randn(1, 4, D, requires_grad=True)
    projection = SaliencyProjection(in_channels=C, out_channels=D, learned=True)
    losses = kernel_supervision_loss([kernels], [torch.zeros(0, C)], [[_match([], [])]], projection)
    assert losses["loss_ker_s1"].item() == 0.0
    losses["loss_ker_s1"].backward()
    assert kernels.grad is not None and projection.weight.grad is not None


def test_mismatched_inputs_are_errors():
    kernels = torch.randn(1, 4, D)
    with pytest.raises(ValueError, match="stages 1..S"):
        kernel_supervision_loss(
            [kernels], [torch.randn(1, C)], [[_match([0], [0])]] * 2, _identity_projection()
        )
    with pytest.raises(ValueError, match="channels"):
        kernel_supervision_loss(
            [kernels], [torch.randn(1, C + 1)], [[_match([0], [0])]], _identity_projection()
        )


def test_fixed_projection_has_no_parameters_and_keeps_angles():
    projection = SaliencyProjection(in_channels=C, out_channels=2 * C, learned=False)
    assert list(projection.parameters()) == []
    assert "weight" in projection.state_dict()
    queries = torch.randn(6, C)
    targets = projection(queries)
    q = F.normalize(queries, dim=1)
    t = F.normalize(targets, dim=1)
    torch.testing.assert_close(t @ t.T, q @ q.T, atol=1e-5, rtol=0)
    torch.testing.assert_close(
        angle_preservation_loss(queries, targets), torch.tensor(0.0), atol=1e-8, rtol=0
    )


def test_angle_preservation_penalises_collapsed_targets():
    queries = torch.eye(4)  # pairwise cosine 0
    collapsed = torch.ones(4, 3)  # pairwise cosine 1
    torch.testing.assert_close(angle_preservation_loss(queries, collapsed), torch.tensor(1.0))
    assert angle_preservation_loss(queries[:1], collapsed[:1]).item() == 0.0


def _mean_pairwise_cosine(x: torch.Tensor) -> float:
    x = F.normalize(x, dim=1)
    sim = x @ x.T
    off = ~torch.eye(len(x), dtype=torch.bool)
    return sim[off].mean().item()


def _train_kernels_and_projection(
    learned: bool, angle_weight: float, *, shared: bool, seed: int, steps: int = 300
) -> tuple[torch.Tensor, torch.Tensor]:
    """Optimise L_ker (+ the angle term) over the kernels and the projection's parameters (a learned one), or
    over the kernels alone (the fixed one).

    16 masks with distinct random queries. ``shared``: one kernel vector for every mask (the strongest pull
    towards collapse); otherwise one trainable kernel per mask, all starting alike (K-Net's kernels start
    out alike). Returns (targets [16, D], kernels [16, D]) after training.
    """
    torch.manual_seed(seed)
    projection = SaliencyProjection(in_channels=32, out_channels=D, learned=learned)
    queries = F.normalize(torch.randn(16, 32), dim=1)
    start = torch.randn(D)
    kernel = nn.Parameter(start.clone() if shared else start.expand(16, D) + 0.01 * torch.randn(16, D))
    optimizer = torch.optim.Adam([kernel, *projection.parameters()], lr=0.05)
    matches = [[_match(list(range(16)), list(range(16)))]]
    for _ in range(steps):
        kernels = kernel.expand(1, 16, D) if shared else kernel[None]
        loss = kernel_supervision_loss([kernels], [queries], matches, projection)["loss_ker_s1"]
        if angle_weight:
            loss = loss + angle_weight * angle_preservation_loss(queries, projection(queries))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        return projection(queries), kernel.detach().expand(16, D).clone()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_collapse_guard_keeps_distinct_targets_distinct(seed: int):
    """Both guards keep what distinct masks learn distinct; an unguarded learned Linear collapses it.

    Queries' mean pairwise cosine is about 0.02; seen over seeds 0-2 (mean pairwise cosine after 300 steps):
    unguarded targets and kernels 0.94-0.98; learned + angle term 0.03-0.05; fixed projection's kernels
    -0.01-0.07; learned + angle term against one shared kernel 0.38-0.39 (unguarded: 1.0)."""

    # No guard: a trainable Linear lowers the loss by turning every target to the direction the kernels
    # start out sharing, so the kernels never have to tell the masks apart.
    targets, kernels = _train_kernels_and_projection(True, 0.0, shared=False, seed=seed)
    assert _mean_pairwise_cosine(targets) > 0.9 and _mean_pairwise_cosine(kernels) > 0.9
    # The angle term on the same trainable Linear: distinct targets stay distinct, and so the kernels matched
    # to distinct masks become distinct.
    targets, kernels = _train_kernels_and_projection(True, 1.0, shared=False, seed=seed)
    assert _mean_pairwise_cosine(targets) < 0.2 and _mean_pairwise_cosine(kernels) < 0.2
    # The fixed projection: the targets cannot move, so the loss falls only as the kernels, starting alike,
    # learn distinct directions.
    targets, kernels = _train_kernels_and_projection(False, 0.0, shared=False, seed=seed)
    assert F.cosine_similarity(kernels, targets, dim=1).min() > 0.95  # each kernel learnt its own target
    assert _mean_pairwise_cosine(kernels) < 0.2
    # One kernel vector shared by every mask, the strongest pull towards collapse: the angle term holds the
    # learned targets far from it, where without it they collapse completely.
    collapsed, _ = _train_kernels_and_projection(True, 0.0, shared=True, seed=seed)
    assert _mean_pairwise_cosine(collapsed) > 0.99
    held, _ = _train_kernels_and_projection(True, 1.0, shared=True, seed=seed)
    assert _mean_pairwise_cosine(held) < 0.5
