import json

import pytest
import torch
from torch import nn

from sp_ray.config import Config, apply_overrides
from sp_ray.errors import UserError
from sp_ray.train.checkpoint import (
    is_checkpoint,
    load_checkpoint,
    load_init_weights,
    save_checkpoint,
)


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


def test_init_weights_between_plain_and_wrapped_models():
    class Wrapper(nn.Module):  # a pre-training wrapper: the model under WRAPPED_MODEL_PREFIX plus its own head
        def __init__(self) -> None:
            super().__init__()
            self.model = net(out=3)
            self.projection = nn.Linear(2, 2)

    plain, wrapper = net(out=3), Wrapper()
    report = load_init_weights(wrapper, plain.state_dict())  # pretrain --init from a fine-tuned model
    assert not report.skipped and sorted(report.missing) == ["projection.bias", "projection.weight"]
    assert torch.equal(wrapper.model.state_dict()["0.weight"], plain.state_dict()["0.weight"])
    fresh = net(out=3)
    report = load_init_weights(fresh, wrapper.state_dict())  # finetune --init from a pre-training
    assert sorted(report.skipped) == ["projection.bias", "projection.weight"] and not report.missing
    again = Wrapper()
    report = load_init_weights(again, wrapper.state_dict())  # the next self-training round
    assert not report.skipped and not report.missing
    assert torch.equal(again.projection.weight, wrapper.projection.weight)
