"""`sp-ray run --preset tiny` end to end on a COCO set that is not the demo's: its wall time, AP table and
per-category AP, copied into a results file.

The set: ``--num-images`` synthetic shape images (``sp_ray.data.synthetic``) of mixed orientation, 4:3 and 3:4
with a long side of ``--image-size`` (so grouped batching has two groups), written as one COCO json with
category ids 3, 7, 12, 20 (not 1..K) and names of its own, images under a nested folder. ``sp-ray run`` gets
only that json and folder: it holds out its own seeded 20% as val, uses the train images as the unlabeled
pool, and runs every step with the tiny preset's own schedules (``configs/demo/``). The run is one process,
timed from start to exit; ``steps.json`` gives each step's share. Nothing is recomputed from the run's files.

    python benchmarks/run_tiny.py --out runs/run_tiny --results benchmarks/results/run_tiny
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from demo_results import collect, markdown
from results_files import write_results

from sp_ray.data.synthetic import write_synthetic_dataset
from sp_ray.run.options import run_settings
from sp_ray.run.settings import Layout, main_run

CATEGORY_IDS = {1: (3, "coin"), 2: (7, "tile"), 3: (12, "wedge"), 4: (20, "washer")}  # synthetic id -> (id, name)


def write_dataset(root: Path, *, num_images: int, image_size: int, seed: int) -> tuple[Path, Path]:
    """One COCO json (``annotations.json``) over ``images/shapes/*.png`` with the ids of ``CATEGORY_IDS``."""
    source = write_synthetic_dataset(root / "source", num_images=num_images, image_size=image_size, seed=seed,
                                     aspect_ratios=(4 / 3, 3 / 4))
    parts = [json.loads(source[name].read_text()) for name in ("train", "val")]
    images_dir = root / "images" / "shapes"
    images_dir.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for part in parts:
        for image in part["images"]:
            shutil.copy(source["images"] / image["file_name"], images_dir / Path(image["file_name"]).name)
            images.append({**image, "file_name": f"shapes/{Path(image['file_name']).name}"})
        annotations += [{**a, "category_id": CATEGORY_IDS[a["category_id"]][0]} for a in part["annotations"]]
    categories = [{"id": new, "name": name, "supercategory": "shape"} for new, name in CATEGORY_IDS.values()]
    annotation_file = root / "annotations.json"
    annotation_file.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    shutil.rmtree(root / "source")
    return annotation_file, root / "images"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="runs/run_tiny", help="the dataset and the run's output go here")
    parser.add_argument("--results", default="benchmarks/results/run_tiny", help="writes STEM.json and STEM.md")
    parser.add_argument("--num-images", type=int, default=400)
    parser.add_argument("--image-size", type=int, default=160, help="long side of the images")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    root = Path(args.out).resolve()
    if root.exists():
        shutil.rmtree(root)
    annotations, images = write_dataset(root / "dataset", num_images=args.num_images, image_size=args.image_size,
                                        seed=args.seed)
    out = root / "run"
    argv = ["run", "--annotations", str(annotations), "--images", str(images), "--preset", "tiny", "--out", str(out)]
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", "from sp_ray.cli import main; main()", *argv], check=True)
    wall = time.perf_counter() - start

    settings = run_settings(annotations=str(annotations), images=str(images), preset="tiny")
    result: dict[str, Any] = collect(out, settings)
    layout = Layout.of(out, settings)
    detailed = main_run(settings)
    per_category = layout.metrics(detailed).with_name("metrics_per_category.md").read_text()
    result.update({
        "command": "sp-ray " + " ".join(argv), "wall_seconds": wall,
        "dataset": {"images": args.num_images, "long_side": args.image_size, "aspect_ratios": ["4:3", "3:4"],
                    "category_ids": [new for new, _ in CATEGORY_IDS.values()], "seed": args.seed},
        "data_summary": json.loads((out / "data" / "summary.json").read_text()),
        "per_category_run": detailed.name, "per_category_md": per_category,
    })
    table = markdown(result, command="sp-ray run --preset tiny")
    table += (f"\nWall time of the whole `sp-ray run` process: {wall / 60:.1f} min.\n\n"
              f"Per category, {detailed.name} (`{layout.metrics(detailed).relative_to(out)}`):\n\n{per_category}")
    print(table, end="")
    write_results([args.results], result, table)


if __name__ == "__main__":
    main()
