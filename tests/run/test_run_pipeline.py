"""``sp-ray run`` on a small COCO set unlike the synthetic generator's: other category ids, non-square images in
sub-folders, polygons, and a few bad files. Every step, the report and its links, reruns, ``--redo finetune``, and
a step rerun by hand from the resolved configs in the output folder."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from sp_ray.cli import main
from sp_ray.config import load_config
from sp_ray.run.pipeline import build_steps, run_pipeline
from sp_ray.run.runner import StepRecord
from sp_ray.run.settings import Layout, fine_tuning_runs

pytestmark = pytest.mark.slow

CATEGORIES = [{"id": 7, "name": "box"}, {"id": 42, "name": "blob"}]
SIZES = [(72, 48), (48, 80), (64, 40)]  # (W, H): none square
GOOD, MISSING, CORRUPT, WRONG_SIZE = 17, "pics/b/gone.png", "pics/b/broken.jpg", "pics/a/wrong_size.png"
# Tiny models and one epoch everywhere: the pipeline's plumbing is what is tested, not what it learns.
OVERRIDES = [
    "ssl:ssl.epochs=1", "ssl:ssl.batch_size=4", "ssl:ssl.queue_size=16", "ssl:ssl.hidden_dim=32",
    "ssl:ssl.image_size=32",
    "propose:propose.max_size=128", "propose:propose.short_size=128", "propose:propose.shard_size=8",
    "train.epochs=1", "data.max_size=64", "data.short_size=64", "model.num_kernels=8", "model.feat_channels=32",
    "model.ffn_channels=64", "model.num_heads=2", "model.num_stages=1", "train.batch_size=2",
    "train.warmup_iters=2", "eval.batch_size=4", "finetune:train.eval_interval=1",
]


def polygon(kind: str, x: int, y: int, w: int, h: int) -> list[float]:
    if kind == "box":
        return [x, y, x + w, y, x + w, y + h, x, y + h]
    angles = np.linspace(0, 2 * np.pi, 12, endpoint=False)
    return [v for a in angles for v in (x + w / 2 + w / 2 * np.cos(a), y + h / 2 + h / 2 * np.sin(a))]


def write_coco(root: Path) -> tuple[Path, Path]:
    """17 good images of two categories (ids 7 and 42) as polygons, plus a missing, a corrupt and a wrongly
    sized one; image ids from 1000 by 3, annotation ids from 500."""
    images_dir = root / "photos"
    rng = np.random.default_rng(3)
    images, annotations = [], []
    for index in range(GOOD):
        width, height = SIZES[index % len(SIZES)]
        name = f"pics/{'ab'[index % 2]}/img_{index:02d}.{'png' if index % 3 else 'jpg'}"
        pixels = rng.integers(20, 60, size=(height, width, 3), dtype=np.uint8)
        image = Image.fromarray(pixels)
        draw = ImageDraw.Draw(image)
        image_id = 1000 + 3 * index
        for k in range(1 + index % 2):
            category = CATEGORIES[(index + k) % 2]
            w, h = int(rng.integers(12, 22)), int(rng.integers(12, 22))
            x, y = int(rng.integers(0, width - w)), int(rng.integers(0, height - h))
            points = polygon(category["name"], x, y, w, h)
            draw.polygon([(points[i], points[i + 1]) for i in range(0, len(points), 2)],
                         fill=(230, 200, 40) if category["id"] == 7 else (40, 160, 230))
            annotations.append({"id": 500 + len(annotations), "image_id": image_id, "category_id": category["id"],
                                "segmentation": [points], "area": float(w * h), "bbox": [x, y, w, h], "iscrowd": 0})
        (images_dir / name).parent.mkdir(parents=True, exist_ok=True)
        image.save(images_dir / name, quality=95)
        images.append({"id": image_id, "file_name": name, "width": width, "height": height})
    bad = [MISSING, CORRUPT, WRONG_SIZE]
    (images_dir / CORRUPT).write_bytes(b"not a jpeg at all")
    Image.fromarray(np.zeros((30, 30, 3), np.uint8)).save(images_dir / WRONG_SIZE)
    for offset, name in enumerate(bad):
        images.append({"id": 2000 + offset, "file_name": name, "width": 72, "height": 48})
    path = root / "labels" / "instances.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": CATEGORIES}))
    return path, images_dir


def run_args(annotations: Path, images: Path, out: Path) -> list[str]:
    return ["run", "--annotations", str(annotations), "--images", str(images), "--fractions", "0.5",
            "--out", str(out), *OVERRIDES]


@pytest.fixture(scope="module")
def first_run(local_ray, tmp_path_factory):
    """The first ``sp-ray run``: the data, the output folder, the settings and their step records."""
    from sp_ray.cli import parse_args, run_settings_of

    root = tmp_path_factory.mktemp("run")
    annotations, images = write_coco(root)
    out = root / "out"
    settings = run_settings_of(parse_args(run_args(annotations, images, out)))
    return annotations, images, out, settings, run_pipeline(out, settings)


def linked(report: Path) -> list[str]:
    pattern = r'(?:src|href)="([^"]+)"' if report.suffix == ".html" else r"!\[[^\]]*\]\(([^)]+)\)"
    return re.findall(pattern, report.read_text())


def test_every_step_ran_and_wrote_its_outputs(first_run):
    _, _, out, settings, records = first_run
    steps = build_steps(Layout.of(out, settings), settings, None)
    assert [r.name for r in records] == [step.name for step in steps]
    assert all(r.status == "ran" for r in records)
    for step in steps:
        assert step.done(), step.name
    # The variants of a run: the family from SP and from the same backbone without SP.
    assert [run.name for run in fine_tuning_runs(settings)] == ["ssl_50pct", "sp_50pct"]


def test_bad_files_are_left_out_and_counted_and_val_is_held_out(first_run):
    _, _, out, _, _ = first_run
    layout = Layout(out)
    summary = json.loads(layout.data_summary.read_text())
    assert summary["listed_images"] == GOOD + 3 and summary["usable_images"] == GOOD
    assert summary["skipped"] == {"missing": 1, "unreadable": 1, "size differs from the json": 1}
    train, val = (json.loads(p.read_text()) for p in (layout.train_json, layout.val_json))
    assert len(val["images"]) == round(0.2 * GOOD) and len(train["images"]) == GOOD - round(0.2 * GOOD)
    assert not {i["id"] for i in train["images"]} & {i["id"] for i in val["images"]}
    assert {c["id"] for c in train["categories"]} == {7, 42}
    report = (out / "report.md").read_text()
    assert f"{round(0.2 * GOOD)} of them (20%, seed 0) are held out as val" in report
    assert "1 missing, 1 unreadable, 1 size differs from the json" in report


@pytest.mark.parametrize("name", ["report.html", "report.md"])
def test_report_links_only_files_that_exist(first_run, name):
    _, _, out, _, _ = first_run
    links = linked(out / name)
    assert "eval/sp_50pct/metrics_pr_iou50.png" in links and "figures/ap_curves.png" in links
    for link in links:
        assert not link.startswith(("/", "http")) and (out / link).is_file(), link


def test_per_category_table_is_the_evaluate_steps_output(first_run):
    _, _, out, _, _ = first_run
    metrics = json.loads((out / "eval" / "sp_50pct" / "metrics.json").read_text())
    report = (out / "report.md").read_text()
    for row in metrics["per_category"]["segm"]:
        bbox = next(b for b in metrics["per_category"]["bbox"] if b["id"] == row["id"])
        cell = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
        assert (f"| {row['name']} ({row['id']}) | {cell(row['AP'])} | {cell(row['AP50'])} | {cell(bbox['AP'])} | "
                f"{row['gt']} | {row['pred']} |") in report
    assert {row["id"] for row in metrics["per_category"]["segm"]} == {7, 42}


def test_resolved_config_reproduces_a_fine_tuning_run_by_hand(first_run, tmp_path):
    _, _, out, _, _ = first_run
    layout = Layout(out)
    config = layout.config("finetune_sp_50pct")
    command = next(line for line in (out / "report.md").read_text().splitlines()
                   if line.startswith("sp-ray finetune") and "finetune_sp_50pct.yaml" in line)
    assert f"--config {config}" in command and f"--init {layout.pretrain / 'final'}" in command
    work_dir = tmp_path / "by_hand"
    assert main(["finetune", "--config", str(config), "--init", str(layout.pretrain / "final"),
                 "--work-dir", str(work_dir)]) == 0
    ran = layout.finetune / "sp_50pct"
    assert load_config(work_dir / "final" / "config.yaml") == load_config(ran / "final" / "config.yaml")
    by_hand, pipeline = ([json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]
                         for d in (work_dir, ran))
    assert [row["epoch"] for row in by_hand] == [row["epoch"] for row in pipeline]
    assert by_hand[-1]["loss"] == pytest.approx(pipeline[-1]["loss"], rel=1e-4)


def statuses(records: list[StepRecord]) -> dict[str, str]:
    return {r.name: r.status for r in records}


def test_rerun_skips_everything_and_redo_finetune_redoes_from_there(first_run):
    annotations, images, out, settings, _ = first_run
    before = (out / "report.html").stat().st_mtime_ns
    assert set(statuses(run_pipeline(out, settings)).values()) == {"skipped"}
    assert (out / "report.html").stat().st_mtime_ns == before
    pretrained = (out / "sp_pretrain" / "final" / "meta.json").stat().st_mtime_ns
    finetuned = (out / "finetune" / "sp_50pct" / "final" / "meta.json").stat().st_mtime_ns
    assert main([*run_args(annotations, images, out), "--redo", "finetune"]) == 0
    assert (out / "sp_pretrain" / "final" / "meta.json").stat().st_mtime_ns == pretrained
    assert (out / "finetune" / "sp_50pct" / "final" / "meta.json").stat().st_mtime_ns > finetuned
    assert (out / "report.html").stat().st_mtime_ns > before
    assert set(statuses(run_pipeline(out, settings)).values()) == {"skipped"}
