from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn
from torchvision.ops import FrozenBatchNorm2d

from sp_ray.models.backbone import FPN, ResNetBackbone, build_resnet, load_backbone_weights


@pytest.mark.parametrize(
    ("depth", "channels"),
    [(18, [64, 128, 256, 512]), (34, [64, 128, 256, 512]), (50, [256, 512, 1024, 2048])],
)
def test_resnet_returns_c2_to_c5(depth: int, channels: list[int]) -> None:
    backbone = build_resnet(depth, weights=None, frozen_stages=-1, norm_eval=True).eval()
    assert backbone.out_channels == channels
    with torch.no_grad():
        feats = backbone(torch.randn(1, 3, 64, 96))
    assert [tuple(f.shape) for f in feats] == [
        (1, c, 64 // s, 96 // s) for c, s in zip(channels, (4, 8, 16, 32), strict=True)
    ]


def test_norm_eval_uses_frozen_batchnorm_only() -> None:
    frozen = build_resnet(18, weights=None, frozen_stages=-1, norm_eval=True)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in frozen.modules())
    assert any(isinstance(m, FrozenBatchNorm2d) for m in frozen.modules())
    trainable = build_resnet(18, weights=None, frozen_stages=-1, norm_eval=False)
    assert any(isinstance(m, nn.BatchNorm2d) for m in trainable.modules())


@pytest.mark.parametrize("frozen_stages", [-1, 0, 1, 2, 4])
def test_frozen_stages_freeze_stem_and_first_layers(frozen_stages: int) -> None:
    backbone = build_resnet(18, weights=None, frozen_stages=frozen_stages, norm_eval=False)
    parts = ["stem", "layer1", "layer2", "layer3", "layer4"]
    modules = [nn.ModuleList([backbone.conv1, backbone.bn1])] + [getattr(backbone, p) for p in parts[1:]]
    for index, (name, module) in enumerate(zip(parts, modules, strict=True)):
        expect_frozen = index <= frozen_stages
        grads = {p.requires_grad for p in module.parameters()}
        assert grads == {not expect_frozen}, name
    backbone.train()
    for index, module in enumerate(modules):
        bn_modes = {m.training for m in module.modules() if isinstance(m, nn.BatchNorm2d)}
        assert bn_modes == {index > frozen_stages}


def test_frozen_stage_statistics_do_not_move_in_train_mode() -> None:
    backbone = build_resnet(18, weights=None, frozen_stages=1, norm_eval=False).train()
    frozen_bn = backbone.layer1[0].bn1
    live_bn = backbone.layer2[0].bn1
    before_frozen, before_live = frozen_bn.running_mean.clone(), live_bn.running_mean.clone()
    backbone(torch.randn(2, 3, 64, 64))
    assert torch.equal(frozen_bn.running_mean, before_frozen)
    assert not torch.equal(live_bn.running_mean, before_live)


def test_bad_depth_and_frozen_stages_are_rejected() -> None:
    with pytest.raises(ValueError, match="depth"):
        ResNetBackbone(depth=101, frozen_stages=1, norm_eval=True)
    with pytest.raises(ValueError, match="frozen_stages"):
        ResNetBackbone(depth=18, frozen_stages=5, norm_eval=True)


@pytest.fixture(scope="module")
def source_state() -> dict[str, torch.Tensor]:
    """A real torchvision resnet18 state dict with non-trivial BatchNorm statistics."""
    torch.manual_seed(0)
    resnet = torchvision.models.resnet18(weights=None)
    for m in resnet.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.normal_()
            m.bias.data.normal_()
    return {k: v.clone() for k, v in resnet.state_dict().items()}


def _moco(state: dict[str, torch.Tensor]) -> dict:
    body = {f"module.encoder_q.{k}": v for k, v in state.items() if not k.startswith("fc.")}
    body["module.encoder_q.fc.0.weight"] = torch.randn(512, 512)
    body["module.encoder_q.fc.0.bias"] = torch.randn(512)
    body["module.encoder_q.fc.2.weight"] = torch.randn(128, 512)
    body["module.encoder_k.conv1.weight"] = torch.randn(64, 3, 7, 7)
    body["module.queue"] = torch.randn(128, 16)
    return {"epoch": 200, "arch": "resnet18", "state_dict": body}


def _densecl_bare(state: dict[str, torch.Tensor]) -> dict:
    return {"state_dict": {k: v for k, v in state.items() if not k.startswith("fc.")}}


def _densecl_backbone(state: dict[str, torch.Tensor]) -> dict:
    body = {f"backbone.{k}": v for k, v in state.items() if not k.startswith("fc.")}
    body["neck.mlp.0.weight"] = torch.randn(512, 512)
    body["neck.mlp2.0.weight"] = torch.randn(512, 512, 1, 1)
    return {"meta": {}, "state_dict": body}


def _densecl_encoder_q(state: dict[str, torch.Tensor]) -> dict:
    body = {f"encoder_q.0.{k}": v for k, v in state.items() if not k.startswith("fc.")}
    body["encoder_q.1.mlp.0.weight"] = torch.randn(512, 512)
    body["encoder_k.0.conv1.weight"] = torch.randn(64, 3, 7, 7)
    body["queue"] = torch.randn(128, 16)
    return {"state_dict": body}


@pytest.mark.parametrize(
    ("make", "layout", "num_skipped"),
    [
        (lambda s: dict(s), "torchvision", 2),
        (_moco, "moco_v2", 5),
        (_densecl_bare, "densecl", 0),
        (_densecl_backbone, "densecl", 2),
        (_densecl_encoder_q, "densecl", 3),
    ],
)
def test_load_backbone_weights_recognises_layouts(source_state, tmp_path, make, layout, num_skipped) -> None:
    path = tmp_path / "weights.pth"
    torch.save(make(source_state), path)
    backbone = ResNetBackbone(depth=18, frozen_stages=-1, norm_eval=True)
    report = load_backbone_weights(backbone, str(path))
    assert report.layout == layout
    assert len(report.skipped) - sum(k.endswith("num_batches_tracked") for k in report.skipped) == num_skipped
    loaded = backbone.state_dict()
    expected = {k: v for k, v in source_state.items() if not k.startswith("fc.")}
    assert report.loaded == len(loaded) == len([k for k in expected if not k.endswith("num_batches_tracked")])
    for key, value in loaded.items():
        assert torch.equal(value, expected[key]), key


def test_build_resnet_loads_weights(source_state, tmp_path) -> None:
    path = tmp_path / "tv.pth"
    torch.save(source_state, path)
    backbone = build_resnet(18, weights=str(path), frozen_stages=1, norm_eval=True)
    assert torch.equal(backbone.layer3[1].conv2.weight, source_state["layer3.1.conv2.weight"])


def test_load_backbone_weights_lists_missing_and_mis_shaped_keys(source_state, tmp_path) -> None:
    broken = dict(source_state)
    del broken["layer4.1.conv2.weight"]
    broken["layer1.0.conv1.weight"] = torch.randn(64, 64, 1, 1)
    path = tmp_path / "broken.pth"
    torch.save(broken, path)
    with pytest.raises(ValueError) as info:
        load_backbone_weights(ResNetBackbone(depth=18, frozen_stages=-1, norm_eval=True), str(path))
    message = str(info.value)
    assert "broken.pth" in message
    assert "layer4.1.conv2.weight" in message
    assert "layer1.0.conv1.weight" in message


def test_load_backbone_weights_rejects_wrong_depth_with_counts(source_state, tmp_path) -> None:
    path = tmp_path / "r18.pth"
    torch.save(source_state, path)
    with pytest.raises(ValueError) as info:
        load_backbone_weights(ResNetBackbone(depth=50, frozen_stages=-1, norm_eval=True), str(path))
    message = str(info.value)
    assert "ResNet-50" in message and "r18.pth" in message
    assert "missing ResNet tensors" in message and "more)" in message


def test_load_backbone_weights_rejects_file_without_resnet(tmp_path) -> None:
    path = tmp_path / "other.pth"
    torch.save({"state_dict": {"encoder.weight": torch.zeros(2)}}, path)
    with pytest.raises(ValueError, match="no ResNet found.*encoder.weight"):
        load_backbone_weights(ResNetBackbone(depth=18, frozen_stages=-1, norm_eval=True), str(path))


def test_fpn_outputs_pyramid_with_d_channels() -> None:
    fpn = FPN(in_channels=[8, 16, 32, 64], out_channels=16)
    feats = [torch.randn(2, c, 32 // 2**i, 48 // 2**i) for i, c in enumerate([8, 16, 32, 64])]
    outs = fpn(feats)
    assert [tuple(o.shape) for o in outs] == [(2, 16, 32 // 2**i, 48 // 2**i) for i in range(4)]
    # The top-down path carries C5 information down to P2.
    feats_changed = [f.clone() for f in feats]
    feats_changed[3] += 1.0
    assert not torch.allclose(fpn(feats_changed)[0], outs[0])


@pytest.mark.parametrize(
    "content",
    [b"hello world\n", b"version https://git-lfs.github.com/spec/v1\nsize 123\n", b"", bytes(range(256))],
    ids=["text", "lfs-pointer", "empty", "binary"],
)
def test_load_backbone_weights_rejects_non_torch_file(tmp_path, content: bytes) -> None:
    path = tmp_path / "notes.pth"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=r"notes\.pth is not a PyTorch weights file"):
        load_backbone_weights(ResNetBackbone(depth=18, frozen_stages=-1, norm_eval=True), str(path))


def test_load_backbone_weights_rejects_truncated_torch_file(source_state, tmp_path) -> None:
    whole = tmp_path / "whole.pth"
    torch.save(source_state, whole)
    path = tmp_path / "cut.pth"
    path.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    with pytest.raises(ValueError, match=r"cut\.pth is not a PyTorch weights file"):
        load_backbone_weights(ResNetBackbone(depth=18, frozen_stages=-1, norm_eval=True), str(path))
