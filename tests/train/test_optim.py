import pytest
from torch import nn

from sp_ray.config import TrainConfig
from sp_ray.train.optim import build_optimizer, build_scheduler, lr_factor


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = nn.Linear(2, 2)
        self.head = nn.Linear(2, 2)
        self.frozen = nn.Linear(2, 2).requires_grad_(False)


def test_backbone_gets_its_multiplier_and_frozen_params_are_left_out():
    cfg = TrainConfig(lr=1e-3, backbone_lr_mult=0.25)
    opt = build_optimizer(Tiny(), cfg)
    lrs = sorted(g["lr"] for g in opt.param_groups)
    assert lrs == pytest.approx([2.5e-4, 1e-3])
    assert sum(len(g["params"]) for g in opt.param_groups) == 4


def test_warmup_then_step_decay():
    cfg = TrainConfig(lr_schedule="step", lr_steps=[2, 3], lr_gamma=0.1, warmup_iters=10, warmup_ratio=0.001)
    f = lr_factor(cfg, iters_per_epoch=10)
    assert f(0) == pytest.approx(0.001)
    assert f(5) == pytest.approx(0.001 + 0.999 * 0.5)
    assert f(10) == pytest.approx(1.0)
    assert f(19) == pytest.approx(1.0)
    assert f(20) == pytest.approx(0.1)
    assert f(30) == pytest.approx(0.01)


def test_cosine_reaches_zero_and_scheduler_applies_it():
    cfg = TrainConfig(lr=1.0, lr_schedule="cosine", epochs=2, warmup_iters=0, backbone_lr_mult=1.0)
    f = lr_factor(cfg, iters_per_epoch=5)
    assert f(0) == pytest.approx(1.0)
    assert f(5) == pytest.approx(0.5)
    assert f(10) == pytest.approx(0.0, abs=1e-12)
    opt = build_optimizer(Tiny(), cfg)
    sched = build_scheduler(opt, cfg, iters_per_epoch=5)
    for _ in range(5):
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.5)


def test_unknown_schedule():
    with pytest.raises(ValueError, match="lr_schedule"):
        lr_factor(TrainConfig(lr_schedule="poly"), 1)
