"""The training loop end to end on tiny synthetic data: it learns, it checkpoints, it resumes exactly."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from sp_ray.checkpoint import load_checkpoint
from sp_ray.config import load_config
from sp_ray.data.synthetic import write_synthetic_dataset
from sp_ray.errors import EvaluationError, NonFiniteLossError, UserError
from sp_ray.evaluation.coco_eval import METRIC_NAMES, evaluate_checkpoint
from sp_ray.train.loop import fit

DEMO_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "demo" / "knet_tiny_synthetic.yaml"


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    out = tmp_path_factory.mktemp("synthetic")
    return write_synthetic_dataset(out, num_images=10, image_size=96, seed=3)


def tiny_config(data, *extra):
    return load_config(DEMO_CONFIG, [
        f"data.train_annotations={data['train']}", f"data.train_images={data['images']}",
        "data.max_size=96", "data.short_size=96", "data.flip_prob=0.0",
        "model.num_kernels=12", "model.feat_channels=32", "model.ffn_channels=64", "model.num_heads=2",
        "train.batch_size=4", "train.warmup_iters=5", *extra,
    ])


def test_tiny_knet_overfits_a_handful_of_images(tiny_data, tmp_path):
    cfg = tiny_config(tiny_data, "train.epochs=60", "train.lr=1e-3", "train.lr_steps=[50]")
    final = fit(cfg, tmp_path)
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 60
    assert lines[-1]["loss"] < lines[0]["loss"] / 4, (lines[0]["loss"], lines[-1]["loss"])
    metrics, results = evaluate_checkpoint(
        str(final), annotations=str(tiny_data["train"]), images=str(tiny_data["images"]),
    )
    assert results
    assert metrics["segm"]["AP50"] > 30.0, metrics


def test_resume_continues_the_same_run(tiny_data, tmp_path):
    straight = tiny_config(tiny_data, "train.epochs=2", "model.num_stages=1")
    fit(straight, tmp_path / "straight")
    first_half = tiny_config(tiny_data, "train.epochs=1", "model.num_stages=1")
    fit(first_half, tmp_path / "stopped")
    # The stopped run is continued with the full schedule, as `finetune --resume` does.
    fit(straight, tmp_path / "stopped", resume=tmp_path / "stopped" / "last")
    a = load_checkpoint(tmp_path / "straight" / "final").model_state
    b = load_checkpoint(tmp_path / "stopped" / "final").model_state
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5, msg=name)
    ts = load_checkpoint(tmp_path / "stopped" / "last", with_training_state=True).training_state
    assert ts["epoch"] == 2
    # A config that groups the parameters otherwise cannot continue that optimizer state.
    regrouped = tiny_config(tiny_data, "train.epochs=3", "model.num_stages=1", "train.norm_decay_mult=0")
    with pytest.raises(ValueError, match=r"optimizer holds parameter groups of \[\d+, \d+\] tensors where"):
        fit(regrouped, tmp_path / "stopped", resume=tmp_path / "stopped" / "last")


def test_num_classes_must_match_the_data(tiny_data, tmp_path):
    with pytest.raises(ValueError, match="num_classes"):
        fit(tiny_config(tiny_data, "model.num_classes=3", "train.epochs=1"), tmp_path)


def metrics_epochs(work_dir: Path) -> list[int]:
    return [json.loads(line)["epoch"] for line in (work_dir / "metrics.jsonl").read_text().splitlines()]


def test_metrics_hold_each_epoch_once_after_a_stop_and_resume(tiny_data, tmp_path, one_thread, stop_at_step):
    # 8 train images, batch 4: 2 steps per epoch. Checkpoints every 2 epochs; the stop in epoch 4 comes after
    # epoch 3 was logged but only epoch 2 was checkpointed, so epoch 3 is trained twice.
    cfg = tiny_config(tiny_data, "train.epochs=4", "model.num_stages=1", "train.checkpoint_interval=2")
    with pytest.raises(RuntimeError, match="stopped at step 7"):
        fit(cfg, tmp_path, session=stop_at_step(7))
    assert metrics_epochs(tmp_path) == [1, 2, 3]
    assert load_checkpoint(tmp_path / "last", with_training_state=True).training_state["epoch"] == 2
    fit(cfg, tmp_path, resume=tmp_path / "last")
    assert metrics_epochs(tmp_path) == [1, 2, 3, 4]
    assert [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [2, 4, 6, 8]
    # A fresh run in the same directory starts the log over.
    fit(tiny_config(tiny_data, "train.epochs=1", "model.num_stages=1"), tmp_path)
    assert metrics_epochs(tmp_path) == [1]


def test_resume_at_the_last_epoch_keeps_final_as_it_is(tiny_data, tmp_path, one_thread):
    cfg = tiny_config(tiny_data, "train.epochs=1", "model.num_stages=1")
    fit(cfg, tmp_path)
    before = {p.name: p.read_bytes() for p in (tmp_path / "final").iterdir()}
    fit(cfg, tmp_path, resume=tmp_path / "last")
    assert {p.name: p.read_bytes() for p in (tmp_path / "final").iterdir()} == before
    assert metrics_epochs(tmp_path) == [1]
    # Stopped between writing last/ and final/: the resumed run publishes last's model with its epoch and step.
    shutil.rmtree(tmp_path / "final")
    fit(cfg, tmp_path, resume=tmp_path / "last")
    meta = load_checkpoint(tmp_path / "final").meta
    assert meta["epoch"] == 1 and meta["step"] == 2
    assert not (tmp_path / "final" / "optimizer.pt").exists()


def test_a_failing_evaluation_keeps_the_trained_model(tiny_data, tmp_path, one_thread, monkeypatch):
    import sp_ray.train.loop as loop

    final_existed = []

    def broken_evaluation(model, cfg, **kwargs):
        final_existed.append((tmp_path / "final").is_dir())
        raise TypeError("Argument 'bb' has incorrect type")

    monkeypatch.setattr(loop, "evaluate_model", broken_evaluation)
    cfg = tiny_config(tiny_data, "train.epochs=2", "model.num_stages=1", "train.eval_interval=1",
                      f"data.val_annotations={tiny_data['val']}", f"data.val_images={tiny_data['images']}")
    with pytest.raises(EvaluationError, match=r"evaluation of epoch 2 on .*val\.json failed \(TypeError: Argument "
                                              r"'bb'.*the model is saved in .*final; evaluate it") as failed:
        fit(cfg, tmp_path)
    assert str(tmp_path / "final") in str(failed.value)
    # Epoch 1's evaluation failed too and training went on; final/ existed when the last evaluation ran.
    assert final_existed == [False, True]
    meta = load_checkpoint(tmp_path / "final").meta
    assert meta["epoch"] == 2 and "segm_AP" not in meta
    assert metrics_epochs(tmp_path) == [1, 2]
    assert isinstance(failed.value, UserError)  # not retried by Ray Train (sp_ray.train.failures)


def test_evaluation_results_reach_final_and_last(tiny_data, tmp_path, one_thread, monkeypatch):
    import sp_ray.train.loop as loop

    scores = {"segm": {name: 12.5 + i for i, name in enumerate(METRIC_NAMES)}}
    monkeypatch.setattr(loop, "evaluate_model", lambda model, cfg, **kwargs: (scores, []))
    cfg = tiny_config(tiny_data, "train.epochs=1", "model.num_stages=1",
                      f"data.val_annotations={tiny_data['val']}", f"data.val_images={tiny_data['images']}")
    fit(cfg, tmp_path)
    for name in ("final", "last"):
        meta = load_checkpoint(tmp_path / name).meta
        assert meta["segm_AP"] == 12.5 and meta["segm_AP50"] == 13.5 and meta["epoch"] == 1, name
    assert json.loads((tmp_path / "metrics.jsonl").read_text())["segm_AP"] == 12.5


def test_diverged_training_is_a_user_error(tiny_data, tmp_path, one_thread):
    cfg = tiny_config(tiny_data, "train.epochs=1", "model.num_stages=1", "train.lr=1e30", "train.grad_clip=0",
                      "train.warmup_iters=0")
    with pytest.raises(NonFiniteLossError, match="lower train.lr"):
        fit(cfg, tmp_path)
