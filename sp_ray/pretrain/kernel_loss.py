"""Kernel supervision of SP pre-training (METHODS.md 1.3): kernels learn the saliency queries of their masks.

L_ker = sum over stages i and matched pseudo masks l of 1 - cos(Linear(S_l), K^i_{n_l}), S_l the
saliency query that produced pseudo mask l, n_l the kernel that stage i's Hungarian matching gives it.

The targets Linear(S_l) can collapse: with a trainable Linear the loss is also lowered by mapping every
S_l to the direction the kernels already share (the reference code notes that after the projection "all
queries look almost the same"). ``SaliencyProjection`` guards against it in one of two ways:

- fixed (default): a random orthogonal Linear that is never trained. It cannot collapse, and it keeps the
  angles between the (L2-normalised) queries, exactly when D >= C and approximately when D < C, so the
  loss can only be lowered by kernels that encode their masks' queries.
- learned: a trainable Linear (the reference's ``gen_gt_kernel``) with ``angle_preservation_loss``, which
  lets the Linear rotate the queries towards the kernels but keeps the pairwise angles between targets
  those between the queries, so distinct queries keep distinct targets.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Matches = list[tuple[Tensor, Tensor]]


class SaliencyProjection(nn.Module):
    """Linear(S_l): an L2-normalised saliency query (C) mapped to the kernel width D.

    Args:
        in_channels: C, the width of the saliency queries (C5 channels of the proposal backbone).
        out_channels: D, the kernel width.
        learned: False keeps the random orthogonal weight fixed (a persistent buffer, saved with the
            checkpoint); True trains it (pair with ``angle_preservation_loss``).
    """

    def __init__(self, *, in_channels: int, out_channels: int, learned: bool) -> None:
        super().__init__()
        weight = torch.empty(out_channels, in_channels)
        nn.init.orthogonal_(weight)
        self.learned = learned
        self.bias: Tensor | None
        if learned:
            self.weight = nn.Parameter(weight)
            self.bias = nn.Parameter(torch.zeros(out_channels))
        else:
            self.register_buffer("weight", weight)
            self.bias = None

    @property
    def in_features(self) -> int:
        """C, as ``nn.Linear.in_features``."""
        return int(self.weight.shape[1])

    def forward(self, queries: Tensor) -> Tensor:
        """Project.

        Args:
            queries: float [M, C].

        Returns:
            float [M, D].
        """
        return F.linear(F.normalize(queries.float(), dim=-1), self.weight, self.bias)


def kernel_supervision_loss(
    stage_kernels: list[Tensor],
    saliency_queries: list[Tensor],
    matches: list[Matches],
    projection: nn.Module,
    *,
    weight: float = 1.0,
) -> dict[str, Tensor]:
    """L_ker of SP (METHODS.md 1.3) per stage: mean over matched pairs of 1 - cos(Linear(S_l), K^i_n).

    Pairs are (kernel ``pred_idx[j]``, pseudo mask ``tgt_idx[j]``) exactly as the matcher returns them
    (the reference pairs the kernels in index order with the masks in ground-truth order, a bug).

    Args:
        stage_kernels: S tensors float [B, N, D], the kernels K^i after stages 1..S.
        saliency_queries: B tensors float [K_b, C], row k the query S of target k of image b.
        matches: S lists (one per stage, aligned with ``stage_kernels``) of B pairs (pred_idx, tgt_idx)
            int64 [M_b], as ``KNetCriterion(..., return_matches=True)`` gives them for stages 1..S.
        projection: ``SaliencyProjection`` or ``nn.Linear(C, D)``: float [M, C] queries to [M, D] targets.
        weight: multiplier of every stage's term.

    Returns:
        ``loss_ker_s{i}`` for i = 1..S, float scalars (0, still attached to the graph, for a stage
        without matched pairs).
    """
    if len(matches) != len(stage_kernels):
        raise ValueError(
            f"kernel_supervision_loss: {len(matches)} stage matches for {len(stage_kernels)} stages; "
            "pass the criterion's matches of stages 1..S (without the initial masks')"
        )
    device = stage_kernels[0].device
    counts = [int(q.shape[0]) for q in saliency_queries]
    offsets = torch.tensor([0, *counts], device=device).cumsum(0)
    channels = projection.in_features
    if saliency_queries:
        queries = torch.cat([q.to(device) for q in saliency_queries])  # (sum K_b, C)
    else:
        queries = torch.zeros(0, channels, device=device)
    if queries.shape[1] != channels:
        raise ValueError(
            f"saliency queries have {queries.shape[1]} channels but the projection expects {channels}; "
            "use the prompts.npy written by 'sp-ray propose' with the same backbone"
        )
    targets = projection(queries).float()  # (sum K_b, D)
    losses: dict[str, Tensor] = {}
    for i, (kernels, stage_matches) in enumerate(zip(stage_kernels, matches, strict=True), start=1):
        if len(stage_matches) != len(saliency_queries):
            raise ValueError(
                f"stage {i}: matches for {len(stage_matches)} images but queries for {len(saliency_queries)}"
            )
        batch_idx = torch.cat([torch.full_like(p, b) for b, (p, _) in enumerate(stage_matches)]).to(device)
        pred_idx = torch.cat([p for p, _ in stage_matches]).to(device)
        rows = torch.cat([t.to(device) + offsets[b] for b, (_, t) in enumerate(stage_matches)])
        # Zero terms keep every parameter in the graph when nothing matched (DDP needs that).
        anchor = kernels.sum() * 0 + targets.sum() * 0
        if pred_idx.numel() == 0:
            losses[f"loss_ker_s{i}"] = anchor
            continue
        pred = kernels[batch_idx, pred_idx].float()  # (M, D)
        cosine = F.cosine_similarity(pred, targets[rows], dim=1)
        losses[f"loss_ker_s{i}"] = (1 - cosine).mean() * weight + anchor
    return losses


def angle_preservation_loss(queries: Tensor, targets: Tensor) -> Tensor:
    """Collapse guard of a learned projection: pairwise target cosines must stay those of the queries.

    mean over pairs j != k of (cos(T_j, T_k) - cos(S_j, S_k))^2. Collapsed targets (all cosines 1) cost
    about (1 - mean query cosine)^2; a projection that only rotates the queries costs 0.

    Args:
        queries: float [M, C], the saliency queries S.
        targets: float [M, D], their projections.

    Returns:
        float scalar; 0 (attached to ``targets``) when M < 2.
    """
    if queries.shape[0] != targets.shape[0]:
        raise ValueError(
            f"angle_preservation_loss: {queries.shape[0]} queries but {targets.shape[0]} targets"
        )
    count = queries.shape[0]
    if count < 2:
        return targets.sum() * 0
    q = F.normalize(queries.float(), dim=1)
    t = F.normalize(targets.float(), dim=1)
    off_diagonal = ~torch.eye(count, dtype=torch.bool, device=t.device)
    diff = (t @ t.T - (q @ q.T).to(t.device))[off_diagonal]
    return diff.pow(2).mean()
