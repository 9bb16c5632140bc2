"""The resolved config of every step, and the ``sp-ray`` commands that compute the same thing.

Each config is the preset's file with the run's overrides (data paths, schedule) and then the user's; it is
written to ``OUT/configs/STEP.yaml`` and the step loads that file, so the commands in the report, which
name the same files, are the settings that ran.
"""

from __future__ import annotations

import contextlib
import math
import shlex
from pathlib import Path

from sp_ray.config import Config, dump_config, load_config
from sp_ray.run.settings import (
    Layout,
    Run,
    RunSettings,
    SyntheticData,
    exported_runs,
    fine_tuning_runs,
    kernel_checkpoints,
    main_run,
)


def scaled_lr_steps(config: Path, epochs: int) -> str:
    """The config's lr_steps scaled from its epochs to ``epochs`` (40 epochs [30, 36] -> 12 epochs [9, 11])."""
    train = load_config(config).train
    steps = [max(1, round(step * epochs / train.epochs)) for step in train.lr_steps]
    return f"train.lr_steps=[{','.join(str(step) for step in steps)}]"


def _schedule(config: Path, epochs: int | None) -> list[str]:
    return [] if epochs is None else [f"train.epochs={epochs}", scaled_lr_steps(config, epochs)]


def _gpu(settings: RunSettings) -> list[str]:
    return [f"train.use_gpu={'true' if settings.use_gpu else 'false'}"]


def ssl_overrides(settings: RunSettings) -> list[str]:
    epochs = [] if settings.ssl_epochs is None else [f"ssl.epochs={settings.ssl_epochs}"]
    return [*epochs, *_gpu(settings), *settings.ssl_overrides]


def ssl_depth(settings: RunSettings) -> int:
    """The ResNet depth of the backbone DenseCL trains (the propose, pretrain and fine-tuning configs' too)."""
    return load_config(settings.configs.ssl, ssl_overrides(settings)).model.depth


def propose_overrides(layout: Layout, settings: RunSettings) -> list[str]:
    overrides = [f"model.depth={ssl_depth(settings)}", f"model.backbone_weights={layout.backbone}"]
    if settings.propose_size is not None:
        size = settings.propose_size
        overrides += ["propose.keep_ratio=false", f"propose.max_size={size}", f"propose.short_size={size}"]
    if settings.propose_shard is not None:
        overrides.append(f"propose.shard_size={settings.propose_shard}")
    if settings.propose_actors is not None:
        overrides.append(f"propose.num_actors={settings.propose_actors}")
    return overrides + list(settings.propose_overrides)


def pretrain_overrides(layout: Layout, settings: RunSettings) -> list[str]:
    return [
        f"data.train_annotations={layout.pseudo / 'annotations.json'}", f"data.train_images={layout.unlabeled}",
        f"pretrain.prompts={layout.pseudo / 'prompts.npy'}", f"model.backbone_weights={layout.backbone}",
        *_schedule(settings.configs.pretrain, settings.pretrain_epochs),
        f"train.num_workers={settings.pretrain_workers}", *_gpu(settings), "pretrain.enabled=true",
        *settings.pretrain_overrides,
    ]


def finetune_overrides(layout: Layout, settings: RunSettings, run: Run) -> list[str]:
    """The overrides of one fine-tuning run's config: its labeled split, schedule and evaluation.

    Every run of the model family has the same data, schedule and val evaluation every ``eval_interval``
    epochs; only the initialisation differs (``ssl`` and ``sp``: the self-supervised backbone, ``sp`` also
    ``--init`` from SP pre-training). Mask R-CNN trains ``maskrcnn_epochs`` and is evaluated once, by the
    evaluate step: on a CPU one of its training steps costs about twenty K-Net steps (512 sampled RoIs and a
    4-conv mask head on every positive one) and a val pass runs its box head on 1000 proposals per image.
    A given schedule scales the config's lr_steps to its epochs.
    """
    baseline = run.variant == "maskrcnn"
    epochs = settings.maskrcnn_epochs if baseline else settings.finetune_epochs
    overrides = [
        f"data.train_annotations={layout.split(run.fraction, settings.split_seed)}",
        f"data.train_images={layout.train_images}", *_schedule(run.config(settings), epochs),
        "train.checkpoint_interval=0", *_gpu(settings),
        *([] if settings.detections_per_image is None else [f"eval.topk={settings.detections_per_image}"]),
    ]
    if baseline:
        return overrides + ["data.val_annotations=", "data.val_images=", *settings.baseline_overrides]
    overrides += [f"data.val_annotations={layout.val_json}", f"data.val_images={layout.val_images}"]
    if settings.eval_interval is not None:
        overrides.append(f"train.eval_interval={settings.eval_interval}")
    if run.variant in ("ssl", "sp"):
        # As benchmarks/low_data.py: the same fine-tuning as from scratch, from the self-supervised backbone
        # (and --init from SP pre-training), everything trained, BatchNorm in train mode.
        overrides += [f"model.backbone_weights={layout.backbone}", f"model.depth={ssl_depth(settings)}"]
    return overrides + list(settings.finetune_overrides)


def run_init(layout: Layout, run: Run) -> Path | None:
    return layout.pretrain / "final" if run.variant == "sp" else None


def resolved_configs(layout: Layout, settings: RunSettings) -> dict[str, Config]:
    """Every config the run loads, by file name stem under ``OUT/configs``: ssl, propose, pretrain and one
    ``finetune_<run>`` per fine-tuning run (ssl is absent with ``backbone_weights``).

    Raises:
        sp_ray.config.ConfigError: an override names no key of a config (the message names the config).
    """
    configs = settings.configs
    found: dict[str, Config] = {}
    if settings.runs_ssl:
        found["ssl"] = load_config(configs.ssl, ssl_overrides(settings))
    found["propose"] = load_config(configs.propose, propose_overrides(layout, settings))
    found["pretrain"] = load_config(configs.pretrain, pretrain_overrides(layout, settings))
    for run in fine_tuning_runs(settings):
        found[f"finetune_{run.name}"] = load_config(run.config(settings), finetune_overrides(layout, settings, run))
    return found


def config_texts(layout: Layout, settings: RunSettings) -> dict[Path, str]:
    """The YAML of every resolved config, by the file it is written to."""
    return {layout.config(name): dump_config(cfg) for name, cfg in resolved_configs(layout, settings).items()}


def export_size(layout: Layout, settings: RunSettings) -> int:
    """The square ONNX input side: the fine-tuning resize's long side, rounded up to a multiple of 32."""
    cfg = load_config(layout.run_config(main_run(settings)))
    return 32 * math.ceil(max(cfg.data.max_size, cfg.data.short_size) / 32)


def _shown(path: Path | str) -> str:
    # Paths are shown relative to the working directory when they are inside it. The resolved configs keep
    # the layout's absolute paths, because Ray Train workers do not run in the driver's working directory.
    path = Path(path)
    with contextlib.suppress(ValueError):
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    return str(path)


def _command(*parts: str | Path) -> str:
    return shlex.join(_shown(p) if isinstance(p, Path) else p for p in parts)


def pipeline_command(layout: Layout, settings: RunSettings, *extra: str) -> str:
    """The ``sp-ray demo`` or ``sp-ray run`` command of these settings (``settings.invocation``) with ``extra``."""
    return _command("sp-ray", *settings.invocation, "--out", layout.root, *extra)


def reproduce_commands(layout: Layout, settings: RunSettings) -> dict[str, list[str]]:
    """The ``sp-ray`` commands that compute what each step computes, from the resolved configs of the run.

    The pipeline calls the library functions behind these commands; DenseCL and CPU fine-tuning run in the
    pipeline's own processes rather than in a Ray Train worker, with the same configs and seeds.
    """
    data = settings.data
    if isinstance(data, SyntheticData):
        data_command = _command("sp-ray", "data", "synthetic", "--out", layout.data, "--num-images",
                                str(data.num_images), "--image-size", str(data.image_size), "--seed", "0")
    else:
        data_command = pipeline_command(layout, settings, "--redo", "data")
    commands: dict[str, list[str]] = {
        "data": [data_command],
        "splits": [_command("sp-ray", "data", "split", "--annotations", layout.train_json, "--fractions",
                            *(f"{f:g}" for f in sorted(settings.fractions)), "--seed", str(settings.split_seed),
                            "--out", layout.splits)],
    }
    if settings.runs_ssl:
        commands["ssl"] = [_command("sp-ray", "ssl", "--images", layout.unlabeled, "--config", layout.config("ssl"),
                                    "--work-dir", layout.ssl)]
    commands["propose"] = [_command("sp-ray", "propose", "--images", layout.unlabeled, "--out", layout.pseudo,
                                    "--config", layout.config("propose"))]
    commands["pretrain"] = [_command("sp-ray", "pretrain", "--config", layout.config("pretrain"), "--work-dir",
                                     layout.pretrain)]
    commands.update({"finetune": [], "evaluate": [], "kernels": [], "export": [], "onnx": []})
    for run in fine_tuning_runs(settings):
        init = run_init(layout, run)
        commands["finetune"].append(_command(
            "sp-ray", "finetune", "--config", layout.run_config(run), "--work-dir", layout.run(run),
            *(["--init", init] if init else [])))
        commands["evaluate"].append(_command(
            "sp-ray", "evaluate", "--checkpoint", layout.run(run) / "final", "--annotations", layout.val_json,
            "--images", layout.val_images, "--out", layout.metrics(run)))
    for name, checkpoint in kernel_checkpoints(layout, settings).items():
        commands["kernels"].append(_command(
            "sp-ray", "analyze-kernels", "--checkpoint", checkpoint, "--images", layout.val_json,
            "--image-root", layout.val_images, "--out", layout.kernels / f"{name}.png",
            "--num-images", str(settings.kernel_images)))
    size = export_size(layout, settings) if layout.run_config(main_run(settings)).is_file() else None
    for run in exported_runs(settings):
        commands["export"].append(_command(
            "sp-ray", "export", "--checkpoint", layout.run(run) / "final", "--out", layout.onnx(run),
            *(["--input-size", f"{size}x{size}"] if size else []), "--batch", "1"))
    main = main_run(settings)
    commands["onnx"].append(_command(
        "sp-ray", "evaluate", "--onnx", layout.onnx(main), "--annotations", layout.val_json, "--images",
        layout.val_images, "--threads", str(settings.onnx_threads),
        "--out", layout.onnx_eval / main.name / "metrics.json"))
    commands["throughput"] = [pipeline_command(layout, settings, "--redo", "throughput")]
    commands["report"] = [pipeline_command(layout, settings, "--redo", "report")]
    return commands
