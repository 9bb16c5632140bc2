import json

import pytest
import torch
from torch import nn

from sp_ray.checkpoint import (
    copy_as_final,
    init_from_checkpoint,
    is_checkpoint,
    load_checkpoint,
    load_init_weights,
    save_checkpoint,
    split_legacy_state,
)
from sp_ray.config import Config, apply_overrides
from sp_ray.errors import UserError
from sp_ray.objectives import Trainable


def net(out: int = 3) -> nn.Module:
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, out))


def test_round_trip(tmp_path):
    model = net()
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    cfg = apply_overrides(Config(), ["model.num_kernels=7"])
    path = save_checkpoint(tmp_path / "ck", model=model, config=cfg, meta={"epoch": 3},
                           training_state={"optimizer": opt.state_dict(), "epoch": 3, "step": 30})
    assert is_checkpoint(path)
    ck = load_checkpoint(path, with_training_state=True)
    assert ck.config == cfg
    assert ck.meta["epoch"] == 3 and "torch" in ck.meta["versions"] and ck.meta["config_hash"]
    for name, tensor in model.state_dict().items():
        assert torch.equal(ck.model_state[name], tensor)
    fresh = net()
    opt2 = torch.optim.AdamW(fresh.parameters())
    opt2.load_state_dict(ck.training_state["optimizer"])
    assert ck.training_state["step"] == 30
    assert torch.equal(opt2.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])


def test_save_replaces_atomically_and_leaves_no_temporaries(tmp_path):
    first, second = net(), net()
    save_checkpoint(tmp_path / "last", model=first, config=Config(), meta={"epoch": 1})
    save_checkpoint(tmp_path / "last", model=second, config=Config(), meta={"epoch": 2})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last"]
    ck = load_checkpoint(tmp_path / "last")
    assert ck.meta["epoch"] == 2
    assert torch.equal(ck.model_state["0.weight"], second.state_dict()["0.weight"])


def test_failed_save_keeps_the_previous_checkpoint(tmp_path):
    save_checkpoint(tmp_path / "last", model=net(), config=Config(), meta={"epoch": 1})
    with pytest.raises(TypeError):
        save_checkpoint(tmp_path / "last", model=net(), config=Config(), meta={"epoch": object()})
    assert json.loads((tmp_path / "last" / "meta.json").read_text())["epoch"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last"]


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="not an sp-ray checkpoint"):
        load_checkpoint(tmp_path)
    save_checkpoint(tmp_path / "final", model=net(), config=Config(), meta={})
    with pytest.raises(UserError, match=r"final has no optimizer\.pt: it is a final model, not a resumable run"):
        load_checkpoint(tmp_path / "final", with_training_state=True)


class _RunsCode:
    """Pickles to a call of os.mkdir: a checkpoint that would run code if loaded without weights_only."""

    def __init__(self, target) -> None:
        self.target = str(target)

    def __reduce__(self):
        import os

        return (os.mkdir, (self.target,))


def test_damaged_or_hostile_model_file_is_a_clear_error(tmp_path):
    path = save_checkpoint(tmp_path / "ckpt", model=net(), config=Config(), meta={})
    intact = (path / "model.pt").read_bytes()
    (path / "model.pt").write_bytes(intact[: len(intact) // 2])
    with pytest.raises(UserError, match=r"model\.pt \(the model of checkpoint .*\) is truncated") as truncated:
        load_checkpoint(path)
    marker = tmp_path / "code_ran"
    torch.save({"weight": _RunsCode(marker)}, path / "model.pt")
    with pytest.raises(UserError, match=r"cannot be loaded safely: it references posix\.mkdir") as hostile:
        load_checkpoint(path)
    assert not marker.exists()
    for error in (truncated.value, hostile.value):
        assert "weights_only=False" not in str(error) and "weights_only` set to `False`" not in str(error)
    (path / "model.pt").write_bytes(intact)
    (path / "meta.json").write_text('{"epoch": ')
    with pytest.raises(UserError, match=r"config\.yaml or meta\.json is damaged"):
        load_checkpoint(path)


def test_init_weights_report():
    source = net(out=3).state_dict()
    source["extra.weight"] = torch.zeros(1)
    target = net(out=5)
    before = target.state_dict()["2.weight"].clone()
    report = load_init_weights(target, source)
    assert sorted(report.loaded) == ["0.bias", "0.weight"]
    assert sorted(report.reinitialised) == ["2.bias", "2.weight"]
    assert report.skipped == ["extra.weight"]
    assert torch.equal(target.state_dict()["0.weight"], source["0.weight"])
    assert torch.equal(target.state_dict()["2.weight"], before)
    assert "re-initialised" in report.summary()


class _Objective(nn.Module):  # an SP-like objective: the pre-training-only tensors beside the model
    def __init__(self) -> None:
        super().__init__()
        self.projection = nn.Linear(2, 2, bias=False)
        self.prompt_encoder = nn.Linear(3, 2)

    def forward(self, model, images, targets):
        raise NotImplementedError


def test_model_and_objective_files_round_trip(tmp_path):
    model, objective = net(), _Objective()
    path = save_checkpoint(tmp_path / "ck", model=model, objective=objective, config=Config(), meta={})
    assert (path / "objective.pt").is_file()
    ck = load_checkpoint(path)
    assert sorted(ck.model_state) == sorted(model.state_dict())
    assert sorted(ck.objective_state) == ["projection.weight", "prompt_encoder.bias", "prompt_encoder.weight"]
    copy = copy_as_final(path, tmp_path / "final")
    assert sorted(load_checkpoint(copy).objective_state) == sorted(ck.objective_state)
    plain = load_checkpoint(save_checkpoint(tmp_path / "plain", model=model, objective=nn.Module(),
                                            config=Config(), meta={}))
    assert plain.objective_state == {}


def test_old_sp_checkpoint_splits_into_model_and_objective(tmp_path):
    """A model.pt of the single-file format (SP's wrapper: the detector under ``model.``) loads through
    ``split_legacy_state`` and resumes a Trainable."""
    path = save_checkpoint(tmp_path / "old", model=net(), config=Config(), meta={})
    old = {
        "model.0.weight": torch.full((8, 4), 1.0), "model.0.bias": torch.full((8,), 2.0),
        "model.2.weight": torch.full((3, 8), 3.0), "model.2.bias": torch.full((3,), 4.0),
        "projection.weight": torch.full((2, 2), 5.0),
        "prompt_encoder.weight": torch.full((2, 3), 6.0), "prompt_encoder.bias": torch.full((2,), 7.0),
    }
    torch.save(old, path / "model.pt")
    assert not (path / "objective.pt").exists()
    model_state, objective_state = split_legacy_state(old)
    assert sorted(model_state) == ["0.bias", "0.weight", "2.bias", "2.weight"]
    assert sorted(objective_state) == ["projection.weight", "prompt_encoder.bias", "prompt_encoder.weight"]
    ck = load_checkpoint(path)
    assert sorted(ck.model_state) == sorted(model_state) and sorted(ck.objective_state) == sorted(objective_state)
    trainable = Trainable(net(), _Objective())
    trainable.model.load_state_dict(ck.model_state)  # strict: every key maps
    trainable.objective.load_state_dict(ck.objective_state)
    assert torch.equal(trainable.model[2].bias, torch.full((3,), 4.0))
    assert torch.equal(trainable.objective.prompt_encoder.bias, torch.full((2,), 7.0))
    # finetune --init from it: the model's tensors, the objective's reported as skipped.
    fresh = net(out=3)
    report = init_from_checkpoint(fresh, nn.Module(), ck)
    assert sorted(report.loaded) == ["0.bias", "0.weight", "2.bias", "2.weight"]
    assert sorted(report.skipped) == ["objective.projection.weight", "objective.prompt_encoder.bias",
                                      "objective.prompt_encoder.weight"]
    # pretrain --init from it: the objective's tensors too.
    again = Trainable(net(), _Objective())
    report = init_from_checkpoint(again.model, again.objective, ck, with_objective=True)
    assert not report.skipped and not report.missing
    assert torch.equal(again.objective.projection.weight, torch.full((2, 2), 5.0))


def test_old_plain_and_iuq_checkpoints_are_model_state_only(tmp_path):
    """Fine-tuning and IUQ runs (whose wrapper wrote the plain model's state dict) wrote plain keys."""
    path = save_checkpoint(tmp_path / "old", model=net(), config=Config(), meta={})
    old = {"0.weight": torch.ones(8, 4), "0.bias": torch.ones(8), "2.weight": torch.ones(3, 8), "2.bias": torch.ones(3)}
    torch.save(old, path / "model.pt")
    ck = load_checkpoint(path)
    assert sorted(ck.model_state) == sorted(old) and ck.objective_state == {}
    net().load_state_dict(ck.model_state)
