"""Prompt-kernel matching, feature prompts and image prompts (SP, METHODS.md 1.2)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sp_ray.pretrain.prompts import (
    ImagePromptEncoder,
    box_cells,
    feature_prompts,
    match_prompts_to_kernels,
    tile_indices,
)

D = 16


def _prompts(count: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    # Orthonormal prompts: each one is far from all the others.
    q, _ = torch.linalg.qr(torch.randn(D, D, generator=generator))
    return q[:count] * 3.0


def _kernels_from(prompts: torch.Tensor, assign: list[int], seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    scales = torch.rand(len(assign), 1, generator=generator) + 0.5
    noise = 0.05 * torch.randn(len(assign), D, generator=generator)
    return prompts[assign] * scales + noise


def test_cosine_matching_gives_every_kernel_the_prompt_it_was_built_from():
    prompts = _prompts(4, seed=0)
    assign = [2, 0, 0, 3, 1, 2, 2, 3, 1, 0]  # several kernels share a prompt, one is in no kernel's name
    kernels = _kernels_from(prompts, assign, seed=1)[None]
    offsets = match_prompts_to_kernels(kernels, [prompts], rule="cosine", drop_prob=0.0)
    assert offsets.shape == (1, len(assign), D)
    torch.testing.assert_close(offsets[0], prompts[assign])


def test_cosine_matching_is_per_image_and_batched_equals_single():
    p0, p1 = _prompts(3, seed=2), _prompts(5, seed=3)
    a0, a1 = [0, 1, 2, 2, 1, 0], [4, 3, 0, 1, 2, 4]
    kernels = torch.stack([_kernels_from(p0, a0, seed=4), _kernels_from(p1, a1, seed=5)])
    batched = match_prompts_to_kernels(kernels, [p0, p1], drop_prob=0.0)
    torch.testing.assert_close(batched[0], p0[a0])
    torch.testing.assert_close(batched[1], p1[a1])
    for b, prompts in enumerate((p0, p1)):
        single = match_prompts_to_kernels(kernels[b : b + 1], [prompts], drop_prob=0.0)
        torch.testing.assert_close(single[0], batched[b])


def test_image_without_prompts_gets_zero_offsets():
    prompts = _prompts(2, seed=6)
    kernels = torch.randn(3, 5, D)
    for rule in ("cosine", "fixed"):
        offsets = match_prompts_to_kernels(
            kernels, [prompts, prompts.new_zeros(0, D), prompts], rule=rule, drop_prob=0.0
        )
        assert torch.equal(offsets[1], torch.zeros(5, D))
        assert offsets[0].abs().sum() > 0 and offsets[2].abs().sum() > 0


def test_tile_indices_follows_the_reference_rule():
    assert tile_indices(20, 100).tolist() == [n // 5 for n in range(100)]
    assert tile_indices(3, 20).tolist() == [0] * 6 + [1] * 6 + [2] * 6 + [0, 1]
    assert tile_indices(1, 4).tolist() == [0, 0, 0, 0]
    assert tile_indices(30, 20).tolist() == list(range(20))  # more items than slots: the first ones
    with pytest.raises(ValueError, match="at least one"):
        tile_indices(0, 5)


def test_fixed_rule_tiles_20_prompts_over_100_kernels():
    prompts = torch.randn(20, D)
    offsets = match_prompts_to_kernels(torch.randn(1, 100, D), [prompts], rule="fixed", drop_prob=0.0)
    torch.testing.assert_close(offsets[0], prompts[[n // 5 for n in range(100)]])


def test_fixed_rule_with_few_prompts_and_few_kernels():
    prompts = torch.randn(3, D)
    offsets = match_prompts_to_kernels(
        torch.randn(2, 100, D), [prompts, prompts[:1]], rule="fixed", drop_prob=0.0
    )
    twenty = [0] * 6 + [1] * 6 + [2] * 6 + [0, 1]
    torch.testing.assert_close(offsets[0], prompts[[twenty[n // 5] for n in range(100)]])
    torch.testing.assert_close(offsets[1], prompts[[0] * 100])
    # Fewer kernels than num_prompts: the first N of the tiled prompts.
    small = match_prompts_to_kernels(torch.randn(1, 8, D), [prompts], rule="fixed", drop_prob=0.0)
    torch.testing.assert_close(small[0], prompts[twenty[:8]])


def test_prompts_beyond_num_prompts_are_not_used():
    prompts = _prompts(6, seed=7)
    kernels = _kernels_from(prompts, [5, 5, 5], seed=8)[None]  # built from a prompt past the cap
    offsets = match_prompts_to_kernels(kernels, [prompts], num_prompts=4, drop_prob=0.0)
    used = {tuple(row.tolist()) for row in offsets[0]}
    assert used <= {tuple(p.tolist()) for p in prompts[:4]}


def test_drop_probability():
    prompts = _prompts(4, seed=9)
    kernels = torch.randn(4, 500, D)
    generator = torch.Generator().manual_seed(0)
    offsets = match_prompts_to_kernels(kernels, [prompts] * 4, drop_prob=0.1, generator=generator)
    dropped = (offsets.abs().sum(-1) == 0).float().mean().item()
    assert 0.08 < dropped < 0.12, dropped
    again = match_prompts_to_kernels(
        kernels, [prompts] * 4, drop_prob=0.1, generator=torch.Generator().manual_seed(0)
    )
    torch.testing.assert_close(again, offsets)
    kept = match_prompts_to_kernels(kernels, [prompts] * 4, drop_prob=0.0)
    assert bool((kept.abs().sum(-1) > 0).all())


def test_gradient_reaches_the_prompts_not_the_initial_kernels():
    prompts = _prompts(3, seed=10).requires_grad_(True)
    kernels = torch.randn(1, 6, D, requires_grad=True)
    match_prompts_to_kernels(kernels, [prompts], drop_prob=0.0).sum().backward()
    assert kernels.grad is None
    assert prompts.grad is not None and prompts.grad.abs().sum() > 0


def test_bad_inputs_are_named():
    kernels = torch.randn(1, 4, D)
    with pytest.raises(ValueError, match="rule"):
        match_prompts_to_kernels(kernels, [torch.randn(2, D)], rule="hungarian")
    with pytest.raises(ValueError, match="kernel width"):
        match_prompts_to_kernels(kernels, [torch.randn(2, D + 1)])
    with pytest.raises(ValueError, match="batch of 1"):
        match_prompts_to_kernels(kernels, [torch.randn(2, D)] * 2)
    with pytest.raises(ValueError, match="drop"):
        match_prompts_to_kernels(kernels, [torch.randn(2, D)], drop_prob=1.0)


def test_box_cells_floor_ceil_and_degenerate_boxes():
    boxes = torch.tensor(
        [
            [0.0, 0.0, 64.0, 32.0],  # exactly two by one cells
            [40.0, 10.0, 70.0, 20.0],  # partly covered cells count
            [64.0, 64.0, 64.0, 64.0],  # zero size on a cell boundary: widened to one cell
            [120.0, 120.0, 500.0, 500.0],  # runs off the map: clamped
        ]
    )
    cells = box_cells(boxes, stride=32, height=4, width=4)
    assert cells.tolist() == [[0, 0, 2, 1], [1, 0, 3, 1], [2, 2, 3, 3], [3, 3, 4, 4]]


def test_feature_prompts_average_p5_inside_the_box():
    p5 = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4)
    boxes = [torch.tensor([[0.0, 0.0, 64.0, 32.0], [96.0, 96.0, 96.0, 96.0]]), torch.zeros(0, 4)]
    prompts = feature_prompts(p5, boxes, stride=32)
    assert prompts[0].shape == (2, 3) and prompts[1].shape == (0, 3)
    torch.testing.assert_close(prompts[0][0], p5[0, :, 0, 0:2].mean(dim=1))
    torch.testing.assert_close(prompts[0][1], p5[0, :, 3, 3])


def test_feature_prompts_are_detached():
    p5 = torch.randn(1, 3, 2, 2, requires_grad=True)
    (prompt,) = feature_prompts(p5, [torch.tensor([[0.0, 0.0, 64.0, 64.0]])])
    assert not prompt.requires_grad


class _CountingBackbone:
    def __init__(self) -> None:
        self.calls = 0
        self.conv = torch.nn.Conv2d(3, 8, 32, stride=32)

    def __call__(self, crops: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.conv(crops / 255.0)


@pytest.mark.parametrize("training", [True, False])
def test_image_prompts_one_backbone_pass_and_only_the_linear_learns(training):
    torch.manual_seed(0)
    encoder = ImagePromptEncoder(in_channels=8, out_channels=D, crop_size=64).train(training)
    backbone = _CountingBackbone()
    images = torch.rand(2, 3, 96, 128) * 255
    boxes = [
        torch.tensor([[0.0, 0.0, 50.0, 40.0], [10.0, 20.0, 120.0, 90.0]]),
        torch.tensor([[5.0, 5.0, 6.0, 7.0]]),
    ]
    prompts = encoder(images, boxes, backbone)
    assert [p.shape for p in prompts] == [(2, D), (1, D)]
    assert backbone.calls == 1
    sum(p.sum() for p in prompts).backward()
    assert encoder.proj.weight.grad is not None
    assert backbone.conv.weight.grad is None
    if not training:  # no augmentation: deterministic
        again = encoder(images, boxes, backbone)
        torch.testing.assert_close(torch.cat(again), torch.cat(prompts).detach())


def test_image_prompts_without_boxes_keep_the_linear_in_the_graph():
    encoder = ImagePromptEncoder(in_channels=8, out_channels=D, crop_size=64)
    prompts = encoder(torch.rand(2, 3, 64, 64), [torch.zeros(0, 4), torch.zeros(0, 4)], _CountingBackbone())
    assert [p.shape for p in prompts] == [(0, D), (0, D)]
    assert prompts[0].requires_grad


def test_matching_cosine_uses_normalised_similarity():
    # A long prompt must not win over a well-aligned short one.
    prompts = torch.zeros(2, D)
    prompts[0, 0] = 1.0
    prompts[1, 0], prompts[1, 1] = 100.0, 100.0
    kernel = torch.zeros(1, 1, D)
    kernel[0, 0, 0] = 1.0
    offsets = match_prompts_to_kernels(kernel, [prompts], drop_prob=0.0)
    torch.testing.assert_close(offsets[0, 0], prompts[0])
    assert F.cosine_similarity(kernel[0, 0], prompts[1], dim=0) < 1
