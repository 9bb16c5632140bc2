"""The data step of ``sp-ray run`` (val given or held out, unlabeled folders) and the routing of its overrides."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from sp_ray.config import load_config
from sp_ray.run.data import prepare_user_data
from sp_ray.run.options import run_settings, scoped_overrides
from sp_ray.run.settings import Layout, UserData, preset


def write_set(folder: Path, names: list[str], *, first_id: int = 1) -> Path:
    images = []
    for offset, name in enumerate(names):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((20, 30, 3), 90, np.uint8)).save(folder / name)
        images.append({"id": first_id + offset, "file_name": name, "width": 30, "height": 20})
    anns = [{"id": i + 1, "image_id": image["id"], "category_id": 5, "iscrowd": 0, "area": 9.0,
             "bbox": [1, 1, 3, 3], "segmentation": [[1, 1, 4, 1, 4, 4, 1, 4]]} for i, image in enumerate(images)]
    path = folder / "set.json"
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": [{"id": 5, "name": "x"}]}))
    return path


def test_held_out_val_is_seeded_and_disjoint(tmp_path):
    annotations = write_set(tmp_path / "imgs", [f"{i}.png" for i in range(10)])
    data = UserData(annotations=annotations, images=tmp_path / "imgs", val_fraction=0.3, val_seed=4)
    held = []
    for out in ("a", "b"):
        layout = Layout(tmp_path / out, data.images, data.images)
        summary = prepare_user_data(data, layout)
        train, val = (json.loads(p.read_text()) for p in (layout.train_json, layout.val_json))
        held.append(sorted(i["id"] for i in val["images"]))
        assert summary["val_images"] == 3 and summary["train_images"] == 7
        assert not {i["id"] for i in train["images"]} & set(held[-1])
        assert len(train["annotations"]) == 7 and len(val["annotations"]) == 3
        # The default pool: the train images, linked under the json's file names.
        assert sorted(p.name for p in layout.unlabeled.iterdir()) == sorted(i["file_name"] for i in train["images"])
    assert held[0] == held[1]


def test_given_val_set_and_unlabeled_folders(tmp_path):
    annotations = write_set(tmp_path / "train", ["t0.png", "t1.png"])
    val = write_set(tmp_path / "val", ["v0.png", "v1.png", "gone.png"], first_id=50)
    (tmp_path / "val" / "gone.png").unlink()
    pool_a, pool_b = tmp_path / "pool_a", tmp_path / "pool_b"
    write_set(pool_a, ["p.png", "sub/q.png"])
    write_set(pool_b, ["p.png"])  # the same name as in pool_a: the links stay apart
    (pool_b / "bad.jpg").write_bytes(b"no image")
    data = UserData(annotations=annotations, images=tmp_path / "train", val_annotations=val,
                    val_images=tmp_path / "val", unlabeled=(pool_a, pool_b))
    layout = Layout(tmp_path / "out", data.images, tmp_path / "val")
    summary = prepare_user_data(data, layout)
    assert summary["train_images"] == 2 and summary["val_images"] == 2
    assert summary["val"]["skipped"] == {"missing": 1}
    assert summary["unlabeled"]["images"] == 3 and summary["unlabeled"]["skipped"] == {"unreadable": 1}
    links = sorted(p.relative_to(layout.unlabeled).as_posix() for p in layout.unlabeled.rglob("*.png"))
    assert links == ["0/p.png", "0/sub/q.png", "1/p.png"]
    assert (layout.unlabeled / "1" / "p.png").resolve() == (pool_b / "p.png").resolve()


def test_overrides_go_to_the_configs_that_take_them():
    configs = preset("tiny", "mask2former")
    scoped = scoped_overrides(["model.encoder_layers=1", "train.epochs=3", "finetune:train.eval_interval=2",
                               "ssl:ssl.epochs=1"], configs, ["ssl", "propose", "pretrain", "finetune", "baseline"])
    # A key of Mask2Former's model section: its configs take it, Mask R-CNN's and DenseCL's (K-Net's keys) do not.
    assert [s for s in scoped if "model.encoder_layers=1" in scoped[s]] == ["pretrain", "finetune"]
    assert all("train.epochs=3" in scoped[s] for s in ("pretrain", "finetune", "baseline"))
    assert scoped["finetune"][-1] == "train.eval_interval=2" and "train.eval_interval=2" not in scoped["pretrain"]
    assert scoped["ssl"][-1] == "ssl.epochs=1"


def test_run_settings_resolve_to_the_presets_configs(tmp_path):
    annotations = write_set(tmp_path / "imgs", ["a.png", "b.png"])
    settings = run_settings(annotations=str(annotations), images=str(tmp_path / "imgs"), family="mask2former",
                            baseline="maskrcnn", preset="r50", overrides=["train.epochs=2"])
    assert settings.variants == ("ssl", "sp", "maskrcnn") and settings.pretrain_workers == 2
    from sp_ray.run.commands import resolved_configs

    configs = resolved_configs(Layout.of(tmp_path / "out", settings), settings)
    assert configs["finetune_sp_10pct"].model.name == "mask2former" and configs["finetune_sp_10pct"].model.depth == 50
    assert configs["finetune_maskrcnn_10pct"].model.name == "maskrcnn"
    assert configs["finetune_maskrcnn_10pct"].data.val_annotations == ""  # evaluated once, by the evaluate step
    assert configs["pretrain"].train.epochs == 2 and not configs["pretrain"].train.use_gpu
    base = load_config(Path(__file__).resolve().parents[2] / "configs" / "mask2former_r50_coco_finetune.yaml")
    assert configs["finetune_ssl_5pct"].train.lr == base.train.lr  # the paper's settings, the run's data
    assert configs["finetune_ssl_5pct"].data.train_annotations.endswith("splits/train_5pct_seed0.json")
