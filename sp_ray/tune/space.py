"""The search space of a sweep: dotted config paths with Ray Tune samplers, checked against the Config schema.

In the sweep YAML each stage (``pretrain``, ``finetune``) maps a dotted path of its run config to either a
sampler, a one-key mapping::

    pretrain.prompt_rule: {choice: [cosine, fixed]}      # tune.choice
    pretrain.num_prompts: {grid: [10, 20]}               # tune.grid_search: every value, crossed with the rest
    propose.min_maskness: {uniform: [0.6, 0.8]}          # tune.uniform
    pretrain.kernel_loss_weight: {loguniform: [0.3, 3]}  # tune.loguniform
    model.num_kernels: {randint: [50, 101]}              # tune.randint (upper bound excluded)

or a constant (any other value) that every trial gets. A path that is not in the schema is an error with a
did-you-mean; every value a sampler can produce must fit the key's type. The labeled fraction is always a
grid axis (``fraction``), so with Tune's constant-grid sampling every fraction sees the same draws.
"""

from __future__ import annotations

import difflib
import types
import typing
from dataclasses import dataclass
from typing import Any

import numpy as np
from ray import tune

from sp_ray.config import Config, ConfigError, check_config_tree, config_from_dict, config_to_dict, field_annotation

SAMPLERS = ("choice", "grid", "uniform", "loguniform", "randint")
STAGES = ("pretrain", "finetune")
FRACTION = "fraction"


@dataclass(frozen=True)
class Param:
    """One entry of the space: ``stage`` config, dotted ``path``, a sampler ``kind`` (None = constant)."""

    stage: str
    path: str
    kind: str | None
    args: tuple[Any, ...]  # the sampler's values or bounds; (value,) for a constant

    @property
    def column(self) -> str:
        """The name of the parameter in tables and plots: ``stage/path``."""
        return f"{self.stage}/{self.path}"

    @property
    def log_scale(self) -> bool:
        return self.kind == "loguniform"


def parse_space(space: dict[str, dict[str, object]]) -> list[Param]:
    """Check every entry of ``{stage: {dotted path: sampler or constant}}`` and return them as Params.

    Raises:
        ConfigError: an unknown stage, path or sampler, bounds that are not increasing numbers, or a value
            that does not fit the key's type, naming ``space.<stage>.<path>``.
    """
    params = []
    for stage, entries in space.items():
        if stage not in STAGES:
            raise ConfigError(f"space.{stage}: unknown stage; use one of {STAGES}")
        for path, spec in entries.items():
            params.append(_parse_entry(stage, path, spec))
    return params


def _parse_entry(stage: str, path: str, spec: object) -> Param:
    where = f"space.{stage}.{path}"
    one_key = isinstance(spec, dict) and len(spec) == 1
    is_sampler = one_key and next(iter(spec)) in SAMPLERS
    close = difflib.get_close_matches(str(next(iter(spec))), SAMPLERS, n=1) if one_key and not is_sampler else []
    if close:
        raise ConfigError(f"{where}: unknown sampler {next(iter(spec))!r} (did you mean {close[0]!r}?); "
                          f"samplers: {', '.join(SAMPLERS)}")
    if not is_sampler:
        _check_value(where, path, spec)
        return Param(stage, path, None, (spec,))
    ((kind, args),) = spec.items()
    if kind in ("choice", "grid"):
        if not isinstance(args, list) or not args:
            raise ConfigError(f"{where}: {kind} takes a non-empty list of values, got {args!r}")
        for value in args:
            _check_value(where, path, value)
        return Param(stage, path, kind, tuple(args))
    bounds = isinstance(args, list) and len(args) == 2
    if not bounds or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in args) or (
            not args[0] < args[1]):
        raise ConfigError(f"{where}: {kind} takes [low, high] with low < high, got {args!r}")
    if kind == "loguniform" and args[0] <= 0:
        raise ConfigError(f"{where}: loguniform needs low > 0, got {args[0]}")
    expected = float if kind in ("uniform", "loguniform") else int
    if kind == "randint" and not all(isinstance(v, int) for v in args):
        raise ConfigError(f"{where}: randint takes integer bounds, got {args!r}")
    _check_value(where, path, args[0])  # the path exists and takes numbers
    found = _field_type(path)
    if not _accepts(found, expected):
        raise ConfigError(f"{where}: {kind} draws {expected.__name__} values but '{path}' is {found}")
    return Param(stage, path, kind, tuple(args))


def _check_value(where: str, path: str, value: object) -> None:
    """A value for ``path`` must pass the strict config checker (an unknown key gets a did-you-mean); a loss
    key must be one of some family's (``check_space`` checks it against the stage config's family)."""
    check_config_tree(_nested(path, value), source=where)


def check_space(params: list[Param], bases: dict[str, dict[str, Any] | None]) -> None:
    """Check every parameter against its stage's run config (``{stage: config_to_dict or None}``), e.g. that a
    loss key applies to that config's model.name, before any trial starts.

    Raises:
        ConfigError: naming ``space.<stage>.<path>``.
    """
    for p in params:
        base = bases.get(p.stage)
        if base is not None:
            apply_params(config_from_dict(base), {p.path: p.args[0]}, source=f"space.{p.stage}.{p.path}")


def _field_type(path: str) -> Any:
    """The annotation of a dotted Config path that ``_check_value`` accepted a number for."""
    return field_annotation(path)


def _accepts(annotation: Any, expected: type) -> bool:
    union = typing.get_origin(annotation) in (typing.Union, types.UnionType)
    options = typing.get_args(annotation) if union else (annotation,)
    # An int sampler may feed a float key; a float sampler must not feed an int key.
    return expected in options or (expected is int and float in options)


def _nested(path: str, value: Any) -> dict[str, Any]:
    nested: Any = value
    for part in reversed(path.split(".")):
        nested = {part: nested}
    return nested


def param_space(params: list[Param], fractions: list[float]) -> dict[str, Any]:
    """The Tune ``param_space``: ``{"fraction": grid, "pretrain": {path: domain}, "finetune": {...}}``."""
    space: dict[str, Any] = {FRACTION: tune.grid_search(list(fractions)), "pretrain": {}, "finetune": {}}
    for p in params:
        space[p.stage][p.path] = _domain(p)
    return space


def _domain(p: Param) -> Any:
    if p.kind is None:
        return p.args[0]
    if p.kind == "choice":
        return tune.choice(list(p.args))
    if p.kind == "grid":
        return tune.grid_search(list(p.args))
    if p.kind == "uniform":
        return tune.uniform(*p.args)
    if p.kind == "loguniform":
        return tune.loguniform(*p.args)
    return tune.randint(*p.args)


def apply_params(cfg: Config, values: dict[str, Any], *, source: str) -> Config:
    """Return ``cfg`` with ``{dotted path: value}`` set, checked strictly (values are used as they are).

    Raises:
        ConfigError: a value does not fit its key (``source`` names where the values came from).
    """
    data = config_to_dict(cfg)
    for path, value in values.items():
        node = data
        *parents, leaf = path.split(".")
        for part in parents:
            node = node[part]
        # Tune hands some draws over as numpy scalars; the config wants plain Python values.
        node[leaf] = value.item() if isinstance(value, np.generic) else value
    return config_from_dict(data, source=source)
