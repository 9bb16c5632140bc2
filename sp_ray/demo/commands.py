"""The config overrides of every demo step, and the ``sp-ray`` commands that compute the same thing.

The steps load their configs from these override lists, and `reproduce_commands` renders the same
lists as command lines, so the commands in the report are the settings that ran.
"""

from __future__ import annotations

import contextlib
import shlex
from pathlib import Path

from sp_ray.config import load_config
from sp_ray.demo.settings import (
    DETECTIONS_PER_IMAGE,
    PRETRAIN_CONFIG,
    SPLIT_SEED,
    SSL_CONFIG,
    TINY,
    DemoLayout,
    DemoSettings,
    Run,
    demo_runs,
    exported_runs,
    kernel_checkpoints,
)


def scaled_lr_steps(config: Path, epochs: int) -> str:
    """The config's lr_steps scaled from its epochs to ``epochs`` (40 epochs [30, 36] -> 12 epochs [9, 11])."""
    train = load_config(config).train
    steps = [max(1, round(step * epochs / train.epochs)) for step in train.lr_steps]
    return f"train.lr_steps=[{','.join(str(step) for step in steps)}]"


def ssl_overrides(settings: DemoSettings) -> list[str]:
    return [f"ssl.epochs={settings.ssl_epochs}", *settings.ssl_overrides]


def propose_overrides(layout: DemoLayout, settings: DemoSettings) -> list[str]:
    depth = load_config(SSL_CONFIG, ssl_overrides(settings)).model.depth
    size = settings.propose_size
    return [
        f"model.depth={depth}", f"model.backbone_weights={layout.backbone}", "propose.keep_ratio=false",
        f"propose.max_size={size}", f"propose.short_size={size}", f"propose.shard_size={settings.propose_shard}",
        "propose.num_actors=2", *settings.propose_overrides,
    ]


def pretrain_overrides(layout: DemoLayout, settings: DemoSettings) -> list[str]:
    return [
        f"data.train_annotations={layout.pseudo / 'annotations.json'}", f"data.train_images={layout.images}",
        f"model.backbone_weights={layout.backbone}", f"train.epochs={settings.pretrain_epochs}",
        scaled_lr_steps(PRETRAIN_CONFIG, settings.pretrain_epochs), f"train.num_workers={settings.pretrain_workers}",
        *settings.knet_overrides,
    ]


def finetune_overrides(layout: DemoLayout, settings: DemoSettings, run: Run) -> list[str]:
    """The overrides of one fine-tuning run's config: its labeled split, schedule and evaluation.

    Every K-Net run has the same data, schedule and val evaluation every ``eval_interval`` epochs; only
    the initialisation differs. Mask R-CNN trains ``maskrcnn_epochs`` and is evaluated once, by the
    evaluate step: on a CPU one of its training steps costs about twenty K-Net steps (512 sampled RoIs and
    a 4-conv mask head on every positive one) and a val pass runs its box head on 1000 proposals per image.
    The config's lr_steps are scaled to the epochs.
    """
    epochs = settings.maskrcnn_epochs if run.variant == "maskrcnn" else settings.finetune_epochs
    overrides = [
        f"data.train_annotations={layout.split(run.fraction)}", f"data.train_images={layout.images}",
        f"train.epochs={epochs}", scaled_lr_steps(run.config, epochs), "train.checkpoint_interval=0",
        f"eval.topk={DETECTIONS_PER_IMAGE}",
    ]
    if run.variant == "maskrcnn":
        return overrides + list(settings.maskrcnn_overrides)
    overrides += [f"data.val_annotations={layout.val_json}", f"data.val_images={layout.images}",
                  f"train.eval_interval={settings.eval_interval}"]
    if run.variant == "sp":
        # As benchmarks/low_data.py: the same fine-tuning as from scratch, from the self-supervised backbone
        # (and --init from SP pre-training), everything trained, BatchNorm in train mode.
        overrides.append(f"model.backbone_weights={layout.backbone}")
    return overrides + list(settings.knet_overrides)


def run_init(layout: DemoLayout, run: Run) -> Path | None:
    return layout.pretrain / "final" if run.variant == "sp" else None


def _shown(path: Path | str) -> str:
    # Options (--work-dir, --images, ...) are shown relative to the working directory when they are inside
    # it; the dotted overrides keep the layout's absolute paths, because Ray Train workers do not run in
    # the driver's working directory and would not find a relative data path.
    path = Path(path)
    with contextlib.suppress(ValueError):
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    return str(path)


def _command(*parts: str | Path) -> str:
    return shlex.join(_shown(p) if isinstance(p, Path) else p for p in parts)


def demo_command(layout: DemoLayout, settings: DemoSettings, *extra: str) -> str:
    """``sp-ray demo`` with these settings (``--tiny`` for `TINY`; other custom settings have no flag)."""
    return _command("sp-ray", "demo", "--out", layout.root, *(["--tiny"] if settings == TINY else []), *extra)


def reproduce_commands(layout: DemoLayout, settings: DemoSettings) -> dict[str, list[str]]:
    """The ``sp-ray`` commands that compute what each step computes, with the demo's exact settings.

    The demo calls the library functions behind these commands; DenseCL and fine-tuning run in the
    demo's own processes rather than in a Ray Train worker, with the same seeds.
    """
    largest = max(settings.fractions)
    commands: dict[str, list[str]] = {
        "data": [_command("sp-ray", "data", "synthetic", "--out", layout.data, "--num-images",
                          str(settings.num_images), "--image-size", str(settings.image_size), "--seed", "0")],
        "splits": [_command("sp-ray", "data", "split", "--annotations", layout.train_json, "--fractions",
                            *(f"{f:g}" for f in sorted(settings.fractions)), "--seed", str(SPLIT_SEED),
                            "--out", layout.splits)],
        "ssl": [_command("sp-ray", "ssl", "--images", layout.train_images, "--config", SSL_CONFIG,
                         "--work-dir", layout.ssl, *ssl_overrides(settings))],
        "propose": [_command("sp-ray", "propose", "--images", layout.train_json, "--image-root", layout.images,
                             "--out", layout.pseudo, *propose_overrides(layout, settings))],
        "pretrain": [_command("sp-ray", "pretrain", "--config", PRETRAIN_CONFIG, "--work-dir", layout.pretrain,
                              *pretrain_overrides(layout, settings))],
        "finetune": [],
        "evaluate": [],
        "kernels": [],
        "export": [],
        "onnx": [],
        "throughput": [demo_command(layout, settings, "--redo", "throughput")],
        "report": [demo_command(layout, settings, "--redo", "report")],
    }
    for run in demo_runs(settings):
        init = run_init(layout, run)
        commands["finetune"].append(_command(
            "sp-ray", "finetune", "--config", run.config, "--work-dir", layout.run(run),
            *(["--init", init] if init else []), *finetune_overrides(layout, settings, run)))
        commands["evaluate"].append(_command(
            "sp-ray", "evaluate", "--checkpoint", layout.run(run) / "final", "--annotations", layout.val_json,
            "--images", layout.images, "--out", layout.metrics(run)))
    for name, checkpoint in kernel_checkpoints(layout, settings).items():
        commands["kernels"].append(_command(
            "sp-ray", "analyze-kernels", "--checkpoint", checkpoint, "--images", layout.val_json,
            "--image-root", layout.images, "--out", layout.kernels / f"{name}.png",
            "--num-images", str(settings.kernel_images)))
    size = f"{settings.image_size}x{settings.image_size}"
    for run in exported_runs(settings):
        commands["export"].append(_command(
            "sp-ray", "export", "--checkpoint", layout.run(run) / "final", "--out", layout.onnx(run),
            "--input-size", size, "--batch", "1"))
    knet = Run("sp", largest)
    commands["onnx"].append(_command(
        "sp-ray", "evaluate", "--onnx", layout.onnx(knet), "--annotations", layout.val_json, "--images",
        layout.images, "--threads", str(settings.onnx_threads), "--out", layout.onnx_eval / knet.name / "metrics.json"))
    return commands
