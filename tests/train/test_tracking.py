"""Experiment tracking of a training run: TensorBoard event files read back with TensorBoard's own reader,
an MLflow run read back with MLflow's client, prediction overlays, and the errors of a missing package."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_util
import pytest
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from sp_ray.cli import main
from sp_ray.config import absolute_tracking_uri, load_config
from sp_ray.data.synthetic import write_synthetic_dataset
from sp_ray.errors import UserError
from sp_ray.train.loop import fit
from sp_ray.train.tracking import OVERLAY_MIN_SCORE, PredictionOverlays

DEMO_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "demo" / "knet_tiny_synthetic.yaml"


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    # 8 train images (2 steps of 4 per epoch), 2 val images.
    return write_synthetic_dataset(tmp_path_factory.mktemp("synthetic"), num_images=10, image_size=64, seed=3)


def tiny_config(data, *extra):
    return load_config(DEMO_CONFIG, [
        f"data.train_annotations={data['train']}", f"data.train_images={data['images']}",
        f"data.val_annotations={data['val']}", f"data.val_images={data['images']}",
        "data.max_size=64", "data.short_size=64", "data.flip_prob=0.0", "model.num_stages=1",
        "model.num_kernels=8", "model.feat_channels=32", "model.ffn_channels=64", "model.num_heads=2",
        "train.batch_size=4", "train.warmup_iters=2", "train.epochs=2", "train.eval_interval=1", "eval.topk=10",
        *extra,
    ])  # fmt: skip


def metrics_rows(work_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (work_dir / "metrics.jsonl").read_text().splitlines()]


def events(work_dir: Path) -> EventAccumulator:
    accumulator = EventAccumulator(str(work_dir / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    accumulator.Reload()
    return accumulator


def scalar_series(accumulator: EventAccumulator, tag: str) -> list[tuple[int, float]]:
    return [(e.step, e.value) for e in accumulator.Scalars(tag)]


def test_event_files_hold_the_losses_lr_speed_ap_and_overlays(tiny_data, tmp_path, one_thread):
    fit(tiny_config(tiny_data), tmp_path)
    rows = metrics_rows(tmp_path)
    acc = events(tmp_path)
    tags = acc.Tags()
    loss_terms = sorted(k for k in rows[0] if k.startswith("loss"))
    assert "loss" in loss_terms and len(loss_terms) > 1  # the sum and each term
    for term in loss_terms:
        # Every step: rank 0's batch value; 2 steps per epoch whose mean is the epoch's row.
        per_step = scalar_series(acc, f"train/{term}")
        assert [s for s, _ in per_step] == [1, 2, 3, 4], term
        for epoch, row in enumerate(rows):
            mean = np.mean([v for _, v in per_step[2 * epoch: 2 * epoch + 2]])
            assert mean == pytest.approx(row[term], rel=1e-5), term
        assert scalar_series(acc, f"epoch/{term}") == [(r["step"], pytest.approx(r[term], rel=1e-6)) for r in rows]
    assert [s for s, _ in scalar_series(acc, "train/lr")] == [1, 2, 3, 4]
    for name in ("lr", "images_per_second"):
        assert scalar_series(acc, f"epoch/{name}") == [(r["step"], pytest.approx(r[name], rel=1e-6)) for r in rows]
    for name in ("segm_AP", "segm_AP50", "bbox_AP", "bbox_AP50"):
        assert scalar_series(acc, f"val/{name}") == [(r["step"], pytest.approx(r[name], abs=1e-4)) for r in rows]
    # The 2 val images, drawn at each of the 2 evaluations, at their own size.
    assert sorted(t for t in tags["images"]) == ["val/prediction_0", "val/prediction_1"]
    for tag in tags["images"]:
        shown = acc.Images(tag)
        assert [e.step for e in shown] == [2, 4] and (shown[0].width, shown[0].height) == (64, 64)


def test_tensorboard_can_be_turned_off(tiny_data, tmp_path, one_thread):
    fit(tiny_config(tiny_data, "train.epochs=1", "data.val_annotations=", "train.tensorboard=false"), tmp_path)
    assert (tmp_path / "final").is_dir() and not (tmp_path / "tensorboard").exists()


def test_a_resumed_run_logs_each_step_once_and_a_fresh_one_starts_over(tiny_data, tmp_path, one_thread, stop_at_step):
    cfg = tiny_config(tiny_data, "data.val_annotations=")
    with pytest.raises(RuntimeError, match="stopped at step 4"):
        fit(cfg, tmp_path, session=stop_at_step(4))  # after step 3 was logged, epoch 1 checkpointed (step 2)
    fit(cfg, tmp_path, resume=tmp_path / "last")
    acc = events(tmp_path)
    assert [s for s, _ in scalar_series(acc, "train/loss")] == [1, 2, 3, 4]
    assert [s for s, _ in scalar_series(acc, "epoch/loss")] == [2, 4]
    # The resumed run's step 3 replaces the stopped run's (the same batch: the same value).
    fit(tiny_config(tiny_data, "data.val_annotations=", "train.epochs=1"), tmp_path)
    assert [s for s, _ in scalar_series(events(tmp_path), "train/loss")] == [1, 2]


def test_mlflow_run_holds_params_each_epoch_and_the_final_checkpoint(tiny_data, tmp_path, one_thread, stop_at_step):
    mlflow = pytest.importorskip("mlflow")  # in the dev and tracking extras
    uri = f"file:{tmp_path / 'mlruns'}"
    cfg = tiny_config(tiny_data, f"train.mlflow_tracking_uri={uri}", "train.mlflow_experiment=tiny",
                      "train.lr_steps=[5, 9]")
    work_dir = tmp_path / "run"
    with pytest.raises(RuntimeError, match="stopped at step 4"):
        fit(cfg, work_dir, session=stop_at_step(4))
    fit(cfg, work_dir, resume=work_dir / "last")  # goes on in the same MLflow run
    client = mlflow.tracking.MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("tiny")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    params = run.data.params
    assert params["train.epochs"] == "2" and params["model.num_kernels"] == "8"
    assert params["data.train_annotations"] == str(tiny_data["train"]) and params["train.lr_steps"] == "[5, 9]"
    rows = metrics_rows(work_dir)
    for name in ("loss", "lr", "images_per_second", "segm_AP", "bbox_AP50"):
        history = client.get_metric_history(run.info.run_id, name)
        assert [(m.step, m.value) for m in history] == [(r["epoch"], pytest.approx(r[name])) for r in rows], name
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "final")}
    assert {"final/model.pt", "final/config.yaml", "final/meta.json"} <= artifacts
    local = Path(client.download_artifacts(run.info.run_id, "final/model.pt", str(tmp_path / "download")))
    assert local.read_bytes() == (work_dir / "final" / "model.pt").read_bytes()


def test_a_missing_mlflow_is_a_one_line_error_before_training(tiny_data, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # `import mlflow` raises ImportError
    cfg = tiny_config(tiny_data, f"train.mlflow_tracking_uri=file:{tmp_path / 'mlruns'}")
    with pytest.raises(UserError, match=r"train.mlflow_tracking_uri is set .* pip install 'sp-ray\[tracking\]'"):
        fit(cfg, tmp_path / "in-process")
    assert not (tmp_path / "in-process" / "metrics.jsonl").exists()
    code = main(["finetune", "--config", str(DEMO_CONFIG), "--work-dir", str(tmp_path / "cli"),
                 f"data.train_annotations={tiny_data['train']}", f"data.train_images={tiny_data['images']}",
                 f"train.mlflow_tracking_uri=file:{tmp_path / 'mlruns'}"])
    text = capsys.readouterr().err
    lines = [line for line in text.splitlines() if line.startswith("sp-ray ")]
    assert code == 2 and len(lines) == 1, text
    assert lines[0].startswith("sp-ray finetune: error: train.mlflow_tracking_uri") and "sp-ray[tracking]" in lines[0]
    assert not (tmp_path / "cli").exists()


def test_a_missing_wandb_is_a_clear_error(tiny_data, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(UserError, match=r"train.wandb_project is set \(demo\) but the wandb package is not installed"):
        fit(tiny_config(tiny_data, "train.wandb_project=demo"), tmp_path)


def test_relative_local_tracking_stores_become_absolute(tmp_path):
    assert absolute_tracking_uri("file:mlruns", tmp_path) == f"file:{tmp_path / 'mlruns'}"
    assert absolute_tracking_uri("runs/mlruns", tmp_path) == f"file:{tmp_path / 'runs/mlruns'}"
    assert absolute_tracking_uri("sqlite:///mlflow.db", tmp_path) == f"sqlite:///{tmp_path / 'mlflow.db'}"
    for kept in ("file:/abs/mlruns", "file:///abs/mlruns", "/abs/mlruns", "sqlite:////abs/mlflow.db",
                 "http://127.0.0.1:5000", "databricks", ""):
        assert absolute_tracking_uri(kept, tmp_path) == kept


def test_overlays_draw_the_confident_predictions_of_the_first_images(tmp_path):
    rng = np.random.default_rng(0)
    images = tmp_path / "images"
    images.mkdir()
    pixels = {}
    for index in range(6):
        pixels[index] = rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)
        Image.fromarray(pixels[index]).save(images / f"{index}.png")
    annotations = tmp_path / "val.json"
    annotations.write_text(json.dumps({
        "images": [{"id": 10 + i, "file_name": f"{i}.png", "height": 40, "width": 50} for i in range(6)],
        "categories": [{"id": 7, "name": "thing"}], "annotations": [],
    }))
    square = np.zeros((40, 50), np.uint8)
    square[10:38, 5:45] = 1
    rle = mask_util.encode(np.asfortranarray(square[:, :, None]))[0]
    rle["counts"] = rle["counts"].decode()
    found = {"image_id": 11, "category_id": 7, "score": 0.9, "bbox": [5, 10, 40, 28], "segmentation": rle}
    faint = {**found, "image_id": 12, "score": OVERLAY_MIN_SCORE / 2}
    panels = PredictionOverlays(annotations, images).draw([found, faint, {**found, "image_id": 15}])
    assert len(panels) == 4  # the json's first 4 images
    assert np.array_equal(panels[0], pixels[0]) and np.array_equal(panels[3], pixels[3])
    assert np.array_equal(panels[2], pixels[2])  # below the score to draw
    drawn = panels[1]
    assert drawn.shape == (40, 50, 3)
    # The mask's lower part is coloured in (its upper rows carry the "thing 0.90" label), outside it nothing.
    changed = (drawn != pixels[1]).any(axis=2)
    assert changed[26:37, 6:44].mean() > 0.95
    assert not changed[:10].any() and not changed[38:].any() and not changed[24:, :5].any()


def test_wandb_offline_run_holds_the_config_each_metric_and_the_final_checkpoint(tiny_data, tmp_path, monkeypatch,
                                                                                   one_thread):
    wandb = pytest.importorskip("wandb")  # in the dev extra, not a dependency
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    work_dir = tmp_path / "run"
    fit(tiny_config(tiny_data, "train.wandb_project=tiny", "train.epochs=1"), work_dir)
    wandb.teardown()  # the run's records are written by wandb's service process: wait until it is done
    run_id = (work_dir / ".wandb_run_id").read_text()
    [run_file] = (tmp_path / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb")
    # wandb 0.31 ships no reader of its offline files (records are protobuf, the strings stored as they are):
    # the config keys, the metric names and the final artifact must be in it for `wandb sync` to upload.
    records = run_file.read_bytes()
    for name in ("train.epochs", "model.num_kernels", "loss", "images_per_second", "segm_AP", "bbox_AP50",
                 f"{run_id}-final", "model.pt"):
        assert name.encode() in records, name
