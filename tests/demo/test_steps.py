"""The demo's step runner (skip, force, redo) and its commands, without running the pipeline."""

from __future__ import annotations

import dataclasses
import json
import shlex
from pathlib import Path

import pytest

from sp_ray.cli import PIPELINE_STEPS, build_parser
from sp_ray.config import load_config
from sp_ray.demo.settings import DEMO, TINY
from sp_ray.run.commands import finetune_overrides, reproduce_commands
from sp_ray.run.pipeline import LocalRay, build_steps, write_configs
from sp_ray.run.runner import Step, run_steps
from sp_ray.run.settings import Layout, Run, fine_tuning_runs


def fake_steps(root: Path, calls: list[str]) -> list[Step]:
    """Three steps, each writing one file in its own folder and logging its name."""

    def make(name: str) -> Step:
        folder = root / name

        def run() -> None:
            calls.append(name)
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "out.txt").write_text(name)

        return Step(name, f"step {name}", (folder / "out.txt",), (folder,), run)

    return [make(name) for name in ("a", "b", "c")]


def statuses(records) -> list[str]:
    return [r.status for r in records]


def test_first_run_runs_everything_and_records_times(tmp_path):
    calls: list[str] = []
    records = run_steps(fake_steps(tmp_path, calls), record=tmp_path / "steps.json")
    assert statuses(records) == ["ran"] * 3 and calls == ["a", "b", "c"]
    history = json.loads((tmp_path / "steps.json").read_text())
    assert list(history) == ["a", "b", "c"] and all(entry["seconds"] >= 0 for entry in history.values())


def test_rerun_skips_steps_whose_outputs_exist(tmp_path):
    calls: list[str] = []
    run_steps(fake_steps(tmp_path, calls), record=tmp_path / "steps.json")
    records = run_steps(fake_steps(tmp_path, calls), record=tmp_path / "steps.json")
    assert statuses(records) == ["skipped"] * 3 and calls == ["a", "b", "c"]
    # A skipped step reports the time of the run that produced its outputs.
    history = json.loads((tmp_path / "steps.json").read_text())
    assert [r.seconds for r in records] == [entry["seconds"] for entry in history.values()]


def test_a_missing_output_reruns_only_that_step(tmp_path):
    calls: list[str] = []
    run_steps(fake_steps(tmp_path, calls))
    (tmp_path / "b" / "out.txt").unlink()
    assert statuses(run_steps(fake_steps(tmp_path, calls))) == ["skipped", "ran", "skipped"]
    assert calls[3:] == ["b"]


def test_force_cleans_and_reruns_every_step(tmp_path):
    calls: list[str] = []
    run_steps(fake_steps(tmp_path, calls))
    stale = tmp_path / "a" / "stale.txt"
    stale.write_text("left over")
    assert statuses(run_steps(fake_steps(tmp_path, calls), force=True)) == ["ran"] * 3
    assert calls[3:] == ["a", "b", "c"]
    assert not stale.exists()  # the step's folder was removed before it ran again


def test_redo_reruns_a_step_and_every_later_one(tmp_path):
    calls: list[str] = []
    run_steps(fake_steps(tmp_path, calls))
    assert statuses(run_steps(fake_steps(tmp_path, calls), redo=["b"])) == ["skipped", "ran", "ran"]
    assert statuses(run_steps(fake_steps(tmp_path, calls), redo=["c", "b"])) == ["skipped", "ran", "ran"]


def test_unknown_redo_step(tmp_path):
    with pytest.raises(ValueError, match=r"unknown step\(s\) \['nope'\]; the steps are a, b, c"):
        run_steps(fake_steps(tmp_path, []), redo=["nope"])


def test_a_step_that_writes_nothing_is_an_error(tmp_path):
    step = Step("lazy", "writes nothing", (tmp_path / "never.txt",), (), lambda: None)
    with pytest.raises(RuntimeError, match="'lazy' finished without writing"):
        run_steps([step])


@pytest.mark.parametrize("settings", [DEMO, TINY], ids=["default", "tiny"])
def test_every_step_cleans_its_outputs_and_cli_lists_them(tmp_path, settings):
    steps = build_steps(Layout.of(tmp_path, settings), settings, LocalRay())
    assert tuple(step.name for step in steps) == PIPELINE_STEPS
    for step in steps:
        assert step.outputs, step.name
        # force removes every output first, so a forced step really runs again
        for output in step.outputs:
            assert any(output == c or c in output.parents for c in step.clean), (step.name, output)
        assert not step.done()


def test_runs_and_their_overrides(tmp_path):
    layout = Layout.of(tmp_path, DEMO)
    runs = fine_tuning_runs(DEMO)
    assert [r.name for r in runs] == ["scratch_5pct", "sp_5pct", "maskrcnn_5pct", "scratch_10pct", "sp_10pct",
                                      "maskrcnn_10pct"]
    for run in runs:
        cfg = load_config(run.config(DEMO), finetune_overrides(layout, DEMO, run))
        assert cfg.data.train_annotations == str(layout.split(run.fraction, DEMO.split_seed))
        assert cfg.eval.topk == 20
        if run.variant == "maskrcnn":
            assert cfg.model.name == "maskrcnn" and cfg.train.epochs == DEMO.maskrcnn_epochs
            assert cfg.data.val_annotations == ""  # evaluated once, by the evaluate step
        else:
            assert cfg.train.epochs == 40 and cfg.train.lr_steps == [30, 36]  # the config's own schedule
            assert cfg.data.val_annotations == str(layout.val_json)
            assert (cfg.model.backbone_weights is not None) == (run.variant == "sp")
    # From SP, only the initialisation differs from scratch: the same config, everything trained.
    sp, scratch = (load_config(Run(v, 0.1).config(DEMO), finetune_overrides(layout, DEMO, Run(v, 0.1)))
                   for v in ("sp", "scratch"))
    assert sp.model == dataclasses.replace(scratch.model, backbone_weights=sp.model.backbone_weights)
    assert sp.train == scratch.train and sp.model.frozen_stages == -1 and not sp.model.norm_eval


@pytest.mark.parametrize("settings", [DEMO, TINY], ids=["default", "tiny"])
def test_reproduce_commands_are_valid_sp_ray_invocations(tmp_path, settings):
    layout = Layout.of(tmp_path / "demo", settings)
    write_configs(layout, settings)  # the commands name the resolved configs
    commands = reproduce_commands(layout, settings)
    assert tuple(commands) == PIPELINE_STEPS
    parser = build_parser()
    for name, lines in commands.items():
        assert lines, name
        for line in lines:
            argv = shlex.split(line)
            assert argv[0] == "sp-ray"
            args = parser.parse_args(argv[1:])
            if getattr(args, "config", None) and getattr(args, "overrides", None):
                load_config(args.config, args.overrides)  # every override names a real key
    assert len(commands["finetune"]) == len(fine_tuning_runs(settings))
    pretrain = parser.parse_args(shlex.split(commands["pretrain"][0])[1:])
    assert load_config(pretrain.config, pretrain.overrides).train.num_workers == 2
