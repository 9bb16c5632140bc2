"""The weight average (train.ema_decay): its closed form, and that final/, evaluation and resume use it."""

import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

from sp_ray.checkpoint import load_checkpoint
from sp_ray.config import ConfigError, check_config_values, load_config
from sp_ray.data.synthetic import write_synthetic_dataset
from sp_ray.train.ema import ModelEma
from sp_ray.train.loop import fit

DEMO_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "demo" / "knet_tiny_synthetic.yaml"


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(3))
        self.frozen = nn.Parameter(torch.full((2,), 0.1), requires_grad=False)
        self.register_buffer("running", torch.zeros(2))
        self.register_buffer("count", torch.zeros((), dtype=torch.long))


def test_the_average_after_k_steps_is_the_closed_form():
    decay, steps = 0.9, 7
    module = Tiny()
    module.weight.data = torch.tensor([1.0, -2.0, 0.5])
    w0 = module.weight.detach().double().clone()
    ema = ModelEma(module, decay)
    values = []
    for i in range(1, steps + 1):
        # A known update per step: w_i = w0 * (i + 1) + i / 10; the running buffer w_i / 2; the counter i.
        module.weight.data = (w0 * (i + 1) + i / 10).float()
        module.running.data = (module.weight.detach() / 2)[:2]
        module.count.fill_(i)
        values.append(module.weight.detach().double().clone())
        ema.update(module)
    # EMA_k = d^k w_0 + (1 - d) sum_i d^(k - i) w_i
    expected = decay**steps * w0 + sum((1 - decay) * decay ** (steps - i) * w for i, w in enumerate(values, 1))
    torch.testing.assert_close(ema.module.weight.double(), expected, rtol=1e-6, atol=1e-6)
    expected_running = sum((1 - decay) * decay ** (steps - i) * (w / 2)[:2] for i, w in enumerate(values, 1))
    torch.testing.assert_close(ema.module.running.double(), expected_running, rtol=1e-6, atol=1e-6)
    assert int(ema.module.count) == steps  # integer buffers are copied, not averaged
    assert torch.equal(ema.module.frozen, module.frozen)  # an unchanging tensor stays exact
    assert ema.updates == steps
    assert not ema.module.weight.requires_grad and not ema.module.training


def test_the_state_round_trips():
    module = Tiny()
    ema = ModelEma(module, 0.5)
    module.weight.data += 4
    ema.update(module)
    again = ModelEma(Tiny(), 0.5)
    again.load_state_dict(ema.state_dict())
    assert again.updates == 1 and torch.equal(again.module.weight, torch.full((3,), 2.0))


def test_decay_one_is_refused():
    with pytest.raises(ConfigError, match=r"train.ema_decay is 1.0: it must be in \[0, 1\)"):
        check_config_values(load_config(None, ["train.ema_decay=1"]), task="finetune")


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    return write_synthetic_dataset(tmp_path_factory.mktemp("synthetic"), num_images=10, image_size=64, seed=4)


def tiny_config(data, *extra):
    return load_config(DEMO_CONFIG, [
        f"data.train_annotations={data['train']}", f"data.train_images={data['images']}",
        "data.max_size=64", "data.short_size=64", "data.flip_prob=0.0", "model.num_stages=1",
        "model.num_kernels=8", "model.feat_channels=32", "model.ffn_channels=64", "model.num_heads=2",
        "train.batch_size=4", "train.warmup_iters=2", "train.lr=1e-3", "train.ema_decay=0.5", *extra,
    ])  # fmt: skip


def test_final_and_evaluation_hold_the_average(tiny_data, tmp_path, one_thread, monkeypatch):
    import sp_ray.train.loop as loop

    evaluated = []
    monkeypatch.setattr(loop, "evaluate_model", lambda model, cfg, **kwargs: (
        evaluated.append({k: v.clone() for k, v in model.state_dict().items()}), ({}, []))[1])
    cfg = tiny_config(tiny_data, "train.epochs=2", f"data.val_annotations={tiny_data['val']}",
                      f"data.val_images={tiny_data['images']}")
    fit(cfg, tmp_path)
    final = load_checkpoint(tmp_path / "final")
    last = load_checkpoint(tmp_path / "last", with_training_state=True)
    # 8 training images, batch 4: 2 steps per epoch.
    assert final.meta["ema"] == {"decay": 0.5, "updates": 4}
    saved = last.training_state["ema"]
    assert saved["updates"] == 4
    average = {k.removeprefix("model."): v for k, v in saved["state"].items() if k.startswith("model.")}
    assert average.keys() == final.model_state.keys() == last.model_state.keys()
    for name, tensor in final.model_state.items():
        assert torch.equal(tensor, average[name]), name
        assert torch.equal(tensor, evaluated[-1][name]), name
    # last/ keeps the trained weights themselves, which differ from their average.
    differs = [n for n, t in last.model_state.items() if t.is_floating_point() and not torch.equal(t, average[n])]
    assert differs
    # The export is of final/, the average, and its metadata says so.
    from export.exporter.onnx_export import export_checkpoint

    exported = export_checkpoint(tmp_path / "final", tmp_path / "model.onnx", input_size=(64, 64), batch_size=1,
                                 parity_images=tiny_data["images"], parity_count=1)
    assert exported.parity.passed
    assert exported.info.source.endswith("EMA weights of decay 0.5 after 4 steps)")


def test_resume_restores_the_average(tiny_data, tmp_path, one_thread):
    def run(*extra):
        return tiny_config(tiny_data, "train.ema_decay=0.9", *extra)

    fit(run("train.epochs=2"), tmp_path / "straight")
    fit(run("train.epochs=1"), tmp_path / "stopped")
    shutil.copytree(tmp_path / "stopped", tmp_path / "forgotten")
    fit(run("train.epochs=2"), tmp_path / "stopped", resume=tmp_path / "stopped" / "last")
    a = load_checkpoint(tmp_path / "straight" / "final")
    b = load_checkpoint(tmp_path / "stopped" / "final")
    assert b.meta["ema"] == {"decay": 0.9, "updates": 4}
    for name in a.model_state:
        torch.testing.assert_close(a.model_state[name], b.model_state[name], rtol=1e-4, atol=1e-5, msg=name)
    # Without the saved average the resumed run restarts it from epoch 1's weights: another final model.
    state_file = tmp_path / "forgotten" / "last" / "optimizer.pt"
    state = torch.load(state_file, weights_only=True)
    del state["ema"]
    torch.save(state, state_file)
    fit(run("train.epochs=2"), tmp_path / "forgotten", resume=tmp_path / "forgotten" / "last")
    c = load_checkpoint(tmp_path / "forgotten" / "final")
    assert c.meta["ema"]["updates"] == 2
    assert any(not torch.allclose(a.model_state[n], c.model_state[n], rtol=1e-4, atol=1e-5)
               for n in a.model_state if a.model_state[n].is_floating_point())
