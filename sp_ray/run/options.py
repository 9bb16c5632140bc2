"""``sp-ray run``'s flags -> `RunSettings`: the preset, the variants and the ``[STEP:]KEY=VALUE`` overrides."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from sp_ray.config import ConfigError, load_config
from sp_ray.errors import UserError
from sp_ray.run.settings import OVERRIDE_SCOPES, Preset, RunSettings, UserData, preset


def _scope_config(configs: Preset, scope: str) -> Path | None:
    return {"ssl": configs.ssl, "propose": configs.propose, "pretrain": configs.pretrain,
            "finetune": configs.finetune, "baseline": configs.baseline}[scope]


def scoped_overrides(overrides: Sequence[str], configs: Preset, scopes: Sequence[str]) -> dict[str, list[str]]:
    """Each override by the configs it applies to.

    ``STEP:KEY=VALUE`` applies to the config of STEP (one of `OVERRIDE_SCOPES`); ``KEY=VALUE`` to every config of
    ``scopes`` whose schema takes it (``model.encoder_layers`` to Mask2Former's, not to Mask R-CNN's).

    Raises:
        UserError: an unknown STEP, or an override no config takes (the message is the config's own error).
    """
    found: dict[str, list[str]] = {scope: [] for scope in scopes}
    for item in overrides:
        head, sep, rest = item.partition(":")
        if sep and "=" not in head:
            if head not in OVERRIDE_SCOPES:
                raise UserError(f"override {item!r}: {head!r} is not a step with a config; use one of "
                                f"{', '.join(OVERRIDE_SCOPES)} (or KEY=VALUE for every step)")
            if head not in found:
                raise UserError(f"override {item!r}: this run has no {head} step (baseline needs --baseline, "
                                "ssl runs without --backbone-weights)")
            load_config(_scope_config(configs, head), [rest])  # raises ConfigError naming the key
            found[head].append(rest)
            continue
        errors = []
        for scope in scopes:
            try:
                load_config(_scope_config(configs, scope), [item])
            except ConfigError as err:
                errors.append(f"{scope}: {err}")
                continue
            found[scope].append(item)
        if len(errors) == len(scopes):
            raise UserError(f"override {item!r} fits no step's config ({errors[0]})")
    return found


def run_settings(
    *, annotations: str, images: str, val_annotations: str | None = None, val_images: str | None = None,
    unlabeled: Sequence[str] = (), fractions: tuple[float, ...] = (0.05, 0.1), family: str = "knet",
    baseline: str | None = None, preset: str = "tiny", backbone_weights: str | None = None,
    num_workers: int | None = None, gpu: bool = False, overrides: Sequence[str] = (),
    invocation: tuple[str, ...] = ("run",),
) -> RunSettings:
    """The settings of one ``sp-ray run`` (the configs' own schedules; see the CLI's help for each flag).

    Raises:
        UserError: a bad fraction, flag combination or override.
    """
    for fraction in fractions:
        if not 0 < fraction <= 1:
            raise UserError(f"--fractions {fraction:g}: a labeled fraction is in (0, 1], e.g. 0.1 for 10%")
    if val_images is not None and val_annotations is None:
        raise UserError("--val-images is the folder of --val-annotations' images: give --val-annotations too")
    configs = _preset(preset, family)
    scopes = [s for s in OVERRIDE_SCOPES if (s != "ssl" or backbone_weights is None) and (s != "baseline" or baseline)]
    scoped = scoped_overrides(overrides, configs, scopes)
    return RunSettings(
        data=UserData(annotations=Path(annotations), images=Path(images),
                      val_annotations=Path(val_annotations) if val_annotations else None,
                      val_images=Path(val_images) if val_images else None,
                      unlabeled=tuple(Path(folder) for folder in unlabeled)),
        preset=preset, family=family, variants=("ssl", "sp", *([baseline] if baseline else [])),
        fractions=tuple(sorted(set(fractions))),
        backbone_weights=Path(backbone_weights) if backbone_weights else None, use_gpu=gpu,
        pretrain_workers=num_workers or (1 if gpu else 2),
        ssl_overrides=tuple(scoped.get("ssl", ())), propose_overrides=tuple(scoped["propose"]),
        pretrain_overrides=tuple(scoped["pretrain"]), finetune_overrides=tuple(scoped["finetune"]),
        baseline_overrides=tuple(scoped.get("baseline", ())), invocation=invocation,
    )


def _preset(name: str, family: str) -> Preset:
    try:
        return preset(name, family)
    except ValueError as err:
        raise UserError(str(err)) from None
