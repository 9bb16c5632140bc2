import pytest
import torch
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


class WithNormsAndEmbeddings(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
        self.query_feat = nn.Embedding(5, 4)
        self.level_embed = nn.Parameter(torch.zeros(3, 4))
        self.class_embed = nn.Linear(4, 2)  # a Linear named *_embed is a layer, not an embedding
        self.norm = nn.LayerNorm(4)


def test_norm_and_embedding_decay_factors_as_mask2former_sets_them():
    model = WithNormsAndEmbeddings()
    cfg = TrainConfig(lr=1e-3, weight_decay=0.05, backbone_lr_mult=0.1, norm_decay_mult=0.0, embed_decay_mult=0.0)
    opt = build_optimizer(model, cfg)
    decay_of = {id(p): (g["weight_decay"], g["lr"]) for g in opt.param_groups for p in g["params"]}
    assert len(decay_of) == sum(1 for _ in model.parameters())  # every parameter, once
    expected = {
        "backbone.0.weight": (0.05, 1e-4), "backbone.0.bias": (0.05, 1e-4),
        "backbone.1.weight": (0.0, 1e-4), "backbone.1.bias": (0.0, 1e-4),
        "query_feat.weight": (0.0, 1e-3), "level_embed": (0.0, 1e-3),
        "class_embed.weight": (0.05, 1e-3), "class_embed.bias": (0.05, 1e-3),
        "norm.weight": (0.0, 1e-3), "norm.bias": (0.0, 1e-3),
    }
    for name, param in model.named_parameters():
        assert decay_of[id(param)] == pytest.approx(expected[name]), name
    assert opt.param_groups[0]["lr"] == 1e-3 and opt.param_groups[0]["weight_decay"] == 0.05  # the logged lr
    # The default factors keep the two groups of earlier checkpoints (head, backbone), so they resume.
    assert [len(g["params"]) for g in build_optimizer(model, TrainConfig(backbone_lr_mult=1.0)).param_groups] == [6, 4]


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


def test_a_trainable_is_grouped_as_its_model_with_the_objective_after_it():
    """The groups of ``Trainable(model, objective)``: those of the model alone, in the same order, with the
    objective's parameters (SP's prompt encoder and projection: no backbone) appended to the head group."""
    from sp_ray.objectives import Trainable

    torch.manual_seed(0)
    model = WithNormsAndEmbeddings()
    objective = nn.Module()
    objective.projection = nn.Linear(4, 4)
    cfg = TrainConfig(lr=1e-3, weight_decay=0.05, backbone_lr_mult=0.1, norm_decay_mult=0.0)
    alone = build_optimizer(model, cfg).param_groups
    together = build_optimizer(Trainable(model, objective), cfg).param_groups
    assert [(g["lr"], g["weight_decay"]) for g in together] == [(g["lr"], g["weight_decay"]) for g in alone]
    head = [id(p) for p in alone[0]["params"]] + [id(objective.projection.weight), id(objective.projection.bias)]
    assert [id(p) for p in together[0]["params"]] == head
    for a, b in zip(alone[1:], together[1:], strict=True):
        assert [id(p) for p in a["params"]] == [id(p) for p in b["params"]]
