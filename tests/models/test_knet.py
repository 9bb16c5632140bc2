"""K-Net: what only K-Net does (initial kernels, kernel offsets, its settings and gradients); the checks of every
family (shapes, batched = single, no targets, NaN input, export) are in test_families.py."""

from __future__ import annotations

import pytest
import torch

from sp_ray.models.common import sine_positional_encoding
from sp_ray.models.knet import KNet, build_knet
from sp_ray.objectives.knet_criterion import KNetCriterion
from sp_ray.objectives.matcher import HungarianMatcher

B, H, W = 2, 64, 96
N, C, D, S = 8, 3, 32, 2


def _tiny(**overrides) -> KNet:
    torch.manual_seed(0)
    kwargs = dict(
        num_classes=C, depth=18, num_kernels=N, num_stages=S, feat_channels=D, ffn_channels=64, num_heads=4
    )
    kwargs.update(overrides)
    return build_knet(**kwargs)


@pytest.fixture(scope="module")
def model() -> KNet:
    return _tiny()


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    torch.manual_seed(1)
    return torch.rand(B, 3, H, W) * 255


def test_initial_kernels_pool_features_inside_binarised_initial_masks(model, images) -> None:
    """K^0 = kernel weight + sum over pixels with sigmoid(m^0) > 0.5 of x_feats (METHODS 1.2)."""
    captured = {}
    handle = model.localization.register_forward_hook(lambda _m, _i, out: captured.update(feats=out))
    model.eval()
    with torch.no_grad():
        out = model(images)
    handle.remove()
    loc, sem = captured["feats"]
    weight = model.init_kernels.weight[:, :, 0, 0]  # (N, D)
    m0 = torch.einsum("nd,bdhw->bnhw", weight, loc)
    torch.testing.assert_close(out["init_masks"], m0, rtol=1e-4, atol=1e-4)
    inside = (m0.sigmoid() > 0.5).float()
    expected = weight[None] + torch.einsum("bnhw,bdhw->bnd", inside, loc + sem)
    torch.testing.assert_close(out["init_kernels"], expected, rtol=1e-4, atol=1e-3)


def test_kernel_offsets_change_outputs_but_not_init_kernels(model, images) -> None:
    model.eval()
    offsets = torch.randn(B, N, D) * 10
    with torch.no_grad():
        plain = model(images)
        zero = model(images, kernel_offsets=torch.zeros(B, N, D))
        shifted = model(images, kernel_offsets=offsets)
    torch.testing.assert_close(zero["pred_masks"], plain["pred_masks"])
    torch.testing.assert_close(shifted["init_kernels"], plain["init_kernels"])
    assert not torch.allclose(shifted["pred_logits"], plain["pred_logits"], atol=1e-3)
    assert not torch.allclose(shifted["pred_masks"], plain["pred_masks"], atol=1e-3)


def test_bad_inputs_are_rejected(model, images) -> None:
    with pytest.raises(ValueError, match="multiples of 32"):
        model(torch.zeros(1, 3, 60, 96))
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        model(torch.zeros(3, 64, 96))
    with pytest.raises(ValueError, match="kernel_offsets"):
        model(images, kernel_offsets=torch.zeros(B, N + 1, D))


def test_bad_hyper_parameters_are_rejected() -> None:
    with pytest.raises(ValueError, match="multiple of 32"):
        _tiny(feat_channels=48)
    with pytest.raises(ValueError, match="num_heads"):
        _tiny(num_heads=5)
    with pytest.raises(ValueError, match="num_kernels"):
        _tiny(num_kernels=0)


def test_every_trainable_parameter_gets_a_gradient(images) -> None:
    model = _tiny(frozen_stages=1).train()
    criterion = KNetCriterion(num_classes=C, matcher=HungarianMatcher())
    masks = torch.zeros(2, H, W, dtype=torch.bool)
    masks[0, 8:40, 8:48] = True
    masks[1, 30:60, 50:90] = True
    targets = [
        {"labels": torch.tensor([0, 2]), "masks": masks, "boxes": torch.zeros(2, 4), "image_id": 0,
         "orig_size": (H, W), "image_size": (H, W)},
        {"labels": torch.tensor([1]), "masks": masks[:1], "boxes": torch.zeros(1, 4), "image_id": 1,
         "orig_size": (H, W), "image_size": (H, W)},
    ]  # fmt: skip
    losses = criterion(model(images), targets)
    sum(losses.values()).backward()
    no_grad = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert no_grad == []
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert frozen and all(n.startswith(("backbone.conv1", "backbone.bn1", "backbone.layer1")) for n in frozen)


def test_sine_positional_encoding_matches_definition() -> None:
    pos = sine_positional_encoding(4, 6, 8, like=torch.zeros(1))
    assert pos.shape == (1, 8, 4, 6)
    scale = 2 * torch.pi
    y, x = 2, 5
    y_embed, x_embed = (y + 1) / 4 * scale, (x + 1) / 6 * scale
    # Channel 0: sin(y_embed / 10000^0); channel 3: cos(y_embed / 10000^(2/4)); channel 4 starts x.
    assert pos[0, 0, y, x] == pytest.approx(torch.sin(torch.tensor(y_embed)).item(), abs=1e-5)
    assert pos[0, 3, y, x] == pytest.approx(torch.cos(torch.tensor(y_embed / 100.0)).item(), abs=1e-5)
    assert pos[0, 4, y, x] == pytest.approx(torch.sin(torch.tensor(x_embed)).item(), abs=1e-5)
