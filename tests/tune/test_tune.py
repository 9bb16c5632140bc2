"""`sp-ray tune`: the sweep file and search space, the cache, per-fraction ASHA, results, and tiny real sweeps."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from mlflow.tracking import MlflowClient
from ray.tune.schedulers import AsyncHyperBandScheduler, TrialScheduler
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from sp_ray.config import ConfigError, config_to_dict, load_config
from sp_ray.data.synthetic import write_synthetic_dataset
from sp_ray.tune.cache import cached_build, settings_key
from sp_ray.tune.results import DONE, ERROR, STOPPED, TrialRecord, error_summary, markdown_table, write_results
from sp_ray.tune.scheduler import FractionASHA
from sp_ray.tune.space import apply_params, check_space, param_space, parse_space
from sp_ray.tune.spec import ResourcesConfig, SweepDataConfig, load_sweep
from sp_ray.tune.sweep import max_epochs, run_sweep
from sp_ray.tune.trial import TrialContext, finetune_config, pretrain_settings

RAY_DASHBOARD = True  # ASHA and the stopped sweep kill trials mid-run (tests/conftest.py: local_ray)

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "configs"
# The tiny model of tests/train/test_ray_train.py, for both stages (so that the pre-training loads into it).
TINY = {"data.max_size": 64, "data.short_size": 64, "model.num_kernels": 8, "model.feat_channels": 32,
        "model.ffn_channels": 64, "model.num_heads": 2, "model.num_stages": 1, "train.batch_size": 2,
        "train.warmup_iters": 2}
PRETRAIN = {**TINY, "model.frozen_stages": -1, "propose.max_size": 64, "propose.short_size": 64, "train.epochs": 1}


def write_sweep(path: Path, data: dict, *, cache: Path, finetune: dict, pretrain: dict | None = None,
                fractions=(0.5, 1.0), **extra) -> Path:
    sweep = {
        "name": path.stem, "storage_path": str(path.parent / "storage"), "cache_dir": str(cache),
        "finetune_config": str(CONFIGS / "demo" / "knet_tiny_synthetic.yaml"),
        "pretrain_config": str(CONFIGS / "demo" / "knet_tiny_sp_pretrain.yaml"),
        "fractions": list(fractions),
        "data": {"train_annotations": str(data["train"]), "train_images": str(data["images"]),
                 "val_annotations": str(data["val"]), "val_images": str(data["images"])},
        "space": {"pretrain": {**PRETRAIN, **(pretrain or {})}, "finetune": {**TINY, **finetune}},
        "resources": {"cpus_per_worker": 0.9, "driver_cpus": 0.1},
        **extra,
    }
    path.write_text(yaml.safe_dump(sweep, sort_keys=False))
    return path


# ---- the sweep file and the search space ---------------------------------------------------------------


def test_repo_sweep_files_load():
    for name in ("knet_sp_fractions.yaml", "tiny_synthetic.yaml"):
        sweep = load_sweep(CONFIGS / "tune" / name)
        params = parse_space({"pretrain": sweep.space.pretrain, "finetune": sweep.space.finetune})
        assert Path(sweep.finetune_config).is_file() and Path(sweep.pretrain_config).is_file()
        assert any(p.kind is not None for p in params)


def test_unknown_sweep_key_and_optuna_are_clear_errors(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("name: s\nfractoins: [0.1]\n")
    with pytest.raises(ConfigError, match="did you mean 'fractions'"):
        load_sweep(path)
    path.write_text(yaml.safe_dump({"name": "s", "finetune_config": "x.yaml", "fractions": [0.1],
                                    "data": {k: "x" for k in ("train_annotations", "train_images",
                                                              "val_annotations", "val_images")},
                                    "search": {"searcher": "optuna"}}))
    with pytest.raises(ConfigError, match=r"optuna==5\.0\.0"):
        load_sweep(path)
    with pytest.raises(ConfigError, match="space.pretrain is set but pretrain_config is empty"):
        load_sweep(path, ["search.searcher=basic", "space.pretrain={pretrain.num_prompts: 5}"])


def test_space_paths_and_types_are_checked():
    with pytest.raises(ConfigError, match="did you mean 'pretrain.kernel_loss_weight'"):
        parse_space({"pretrain": {"pretrain.kernel_los_weight": {"uniform": [0.1, 1.0]}}})
    with pytest.raises(ConfigError, match="uniform draws float values but 'pretrain.num_prompts'"):
        parse_space({"pretrain": {"pretrain.num_prompts": {"uniform": [5, 20]}}})
    with pytest.raises(ConfigError, match="must be a str"):
        parse_space({"pretrain": {"pretrain.prompt_rule": {"choice": ["cosine", 3]}}})
    with pytest.raises(ConfigError, match="low < high"):
        parse_space({"finetune": {"train.lr": {"loguniform": [1e-3, 1e-4]}}})
    with pytest.raises(ConfigError, match="unknown sampler 'unifrom' \\(did you mean 'uniform'"):
        parse_space({"finetune": {"train.lr": {"unifrom": [1e-4, 1e-3]}}})
    with pytest.raises(ConfigError, match="takes \\[low, high\\]"):
        parse_space({"finetune": {"train.lr": {"uniform": 0.1}}})
    with pytest.raises(ConfigError, match="unknown stage"):
        parse_space({"propose": {"propose.top_k": 10}})



def test_space_loss_keys_are_checked_against_the_stage_config_family():
    params = parse_space({"finetune": {"loss.l1_weight": {"uniform": [1.0, 5.0]}}})  # a key of some family
    with pytest.raises(ConfigError, match="did you mean 'loss.l1_weight'"):
        parse_space({"finetune": {"loss.l1_weigth": {"uniform": [1.0, 5.0]}}})
    with pytest.raises(ConfigError, match="uniform draws float values but 'loss.pairwise_warmup_iters'"):
        parse_space({"finetune": {"loss.pairwise_warmup_iters": {"uniform": [1, 5]}}})
    knet = config_to_dict(load_config(None, ["model.name=knet"]))
    queryinst = config_to_dict(load_config(None, ["model.name=queryinst"]))
    check_space(params, {"finetune": queryinst, "pretrain": None})
    with pytest.raises(ConfigError, match=r"space\.finetune\.loss\.l1_weight: 'loss\.l1_weight' is a loss key of "
                                          r"QueryInst, not of K-Net"):
        check_space(params, {"finetune": knet, "pretrain": None})

def test_param_space_and_apply_params():
    params = parse_space({
        "pretrain": {"pretrain.prompt_rule": {"grid": ["cosine", "fixed"]}, "pretrain.num_prompts": {"randint": [5, 9]},
                     "train.lr_steps": [2]},
        "finetune": {"train.lr": {"loguniform": [1e-5, 1e-3]}},
    })
    assert [(p.column, p.kind) for p in params] == [
        ("pretrain/pretrain.prompt_rule", "grid"), ("pretrain/pretrain.num_prompts", "randint"),
        ("pretrain/train.lr_steps", None), ("finetune/train.lr", "loguniform")]
    space = param_space(params, [0.1, 0.5])
    assert space["fraction"] == {"grid_search": [0.1, 0.5]}
    assert space["pretrain"]["pretrain.prompt_rule"] == {"grid_search": ["cosine", "fixed"]}
    assert space["pretrain"]["train.lr_steps"] == [2]
    assert space["finetune"]["train.lr"].lower == 1e-5
    import numpy as np

    cfg = apply_params(load_config(), {"pretrain.num_prompts": np.int64(7), "train.lr_steps": [2]}, source="test")
    assert cfg.pretrain.num_prompts == 7 and type(cfg.pretrain.num_prompts) is int and cfg.train.lr_steps == [2]
    with pytest.raises(ConfigError, match="'pretrain.num_prompts' must be a int"):
        apply_params(load_config(), {"pretrain.num_prompts": 2.5}, source="test")


def test_max_epochs_follows_a_swept_epoch_count(tmp_path):
    sweep = SimpleNamespace(scheduler=SimpleNamespace(max_epochs=0))
    base = {"train": {"epochs": 12}}
    assert max_epochs(sweep, parse_space({"finetune": {"train.lr": {"grid": [0.1, 0.2]}}}), base) == 12
    assert max_epochs(sweep, parse_space({"finetune": {"train.epochs": {"choice": [3, 9]}}}), base) == 9
    assert max_epochs(sweep, parse_space({"finetune": {"train.epochs": {"randint": [3, 9]}}}), base) == 8


def _context(tmp_path: Path, **resources) -> TrialContext:
    finetune = load_config(CONFIGS / "demo" / "knet_tiny_synthetic.yaml", ["model.backbone_weights=weights/r18.pth"])
    return TrialContext(
        finetune_base=config_to_dict(finetune), pretrain_base=None, splits={0.1: "/splits/train_10pct_seed0.json"},
        data=SweepDataConfig(train_annotations="/d/train.json", train_images="/d/images", val_annotations="/d/val.json",
                             val_images="/d/images"),
        images_fingerprint="f", cache_dir=str(tmp_path / "cache"), experiment_dir=str(tmp_path), metric="segm_AP",
        resources=ResourcesConfig(**resources), cwd="/home/me/project",
    )


def test_finetune_config_of_a_trial(tmp_path):
    context = _context(tmp_path, num_workers=2, cpus_per_worker=4, gpus_per_worker=0.5)
    cfg = finetune_config(context, {"train.lr": 2e-4}, 0.1)
    assert cfg.train.lr == 2e-4
    assert (cfg.data.train_annotations, cfg.data.val_annotations) == ("/splits/train_10pct_seed0.json", "/d/val.json")
    assert (cfg.train.eval_interval, cfg.train.checkpoint_interval) == (1, 1)  # ASHA and the best checkpoint need both
    assert (cfg.train.num_workers, cfg.train.use_gpu, cfg.train.resources_per_worker) == (2, True, {"CPU": 4.0,
                                                                                                  "GPU": 0.5})
    assert cfg.model.backbone_weights == "/home/me/project/weights/r18.pth"  # trials run in another folder
    assert not finetune_config(_context(tmp_path), {}, 0.1).train.use_gpu


def test_pretrain_key_ignores_how_it_runs_but_not_what_it_computes():
    cfg = load_config(CONFIGS / "demo" / "knet_tiny_sp_pretrain.yaml")
    key = settings_key(pretrain_settings(cfg, "proposals1"))
    runtime = apply_params(cfg, {"train.log_interval": 5, "data.num_workers": 4, "train.max_failures": 0,
                                 "eval.batch_size": 1, "propose.batch_size": 2}, source="test")
    assert settings_key(pretrain_settings(runtime, "proposals1")) == key
    assert settings_key(pretrain_settings(cfg, "proposals2")) != key
    changed = apply_params(cfg, {"pretrain.kernel_loss_weight": 2.0}, source="test")
    assert settings_key(pretrain_settings(changed, "proposals1")) != key


# ---- the cache, the scheduler, the results -----------------------------------------------------------------


def _build_slowly(directory: Path) -> dict:
    with open(directory.parent / "builds.log", "a") as f:
        f.write(f"{os.getpid()}\n")
    time.sleep(0.5)
    (directory / "payload.txt").write_text("x")
    return {"payload": str(directory / "payload.txt")}


def _cached_in_child(root: str, queue) -> None:
    record, hit = cached_build(root, "k", _build_slowly, settings={"a": 1})
    queue.put((record["payload"], hit))


def test_cache_builds_once_under_concurrent_callers(tmp_path):
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    children = [ctx.Process(target=_cached_in_child, args=(str(tmp_path), queue)) for _ in range(3)]
    for child in children:
        child.start()
    for child in children:
        child.join(timeout=30)
    results = [queue.get(timeout=5) for _ in children]
    assert len((tmp_path / "builds.log").read_text().split()) == 1
    assert sorted(hit for _, hit in results) == [False, True, True]
    assert {payload for payload, _ in results} == {str(tmp_path / "k" / "payload.txt")}
    assert json.loads((tmp_path / "k" / "settings.json").read_text()) == {"a": 1}


def test_a_failed_build_is_redone_by_the_next_caller(tmp_path):
    def failing(directory: Path) -> dict:
        raise RuntimeError("out of memory")

    with pytest.raises(RuntimeError):
        cached_build(tmp_path, "k", failing, settings={})
    record, hit = cached_build(tmp_path, "k", _build_slowly, settings={})
    assert not hit and Path(record["payload"]).is_file()


def _trial(trial_id: str, fraction: float) -> SimpleNamespace:
    return SimpleNamespace(trial_id=trial_id, config={"fraction": fraction})


def test_asha_compares_trials_within_their_fraction_only():
    def decisions(scheduler) -> dict[str, str]:
        scheduler.set_search_properties("segm_AP", "max")
        trials = [_trial("big", 0.5), _trial("small_a", 0.1), _trial("small_b", 0.1)]
        for trial in trials:
            scheduler.on_trial_add(None, trial)
        aps = {"big": 30.0, "small_a": 8.0, "small_b": 2.0}
        return {t.trial_id: scheduler.on_trial_result(None, t, {"epoch": 1, "segm_AP": aps[t.trial_id]})
                for t in trials}

    per_fraction = decisions(FractionASHA(time_attr="epoch", max_t=4, grace_period=1, reduction_factor=2))
    assert per_fraction == {"big": TrialScheduler.CONTINUE, "small_a": TrialScheduler.CONTINUE,
                            "small_b": TrialScheduler.STOP}
    # One ASHA over every trial stops the best 10% trial for being below the 50% one.
    pooled = decisions(AsyncHyperBandScheduler(time_attr="epoch", max_t=4, grace_period=1, reduction_factor=2))
    assert pooled["small_a"] == TrialScheduler.STOP


def test_error_summary_finds_the_innermost_exception():
    trace = ("Traceback (most recent call last):\n  File 'x.py', line 3\nray.exceptions.RayTaskError(ConfigError): "
             "ray::run_trial()\nsp_ray.config.ConfigError: pretrain.prompt_rule must be one of ('cosine', 'fixed')\n")
    assert error_summary(trace) == "ConfigError: pretrain.prompt_rule must be one of ('cosine', 'fixed')"
    assert error_summary("killed\n") == "killed"


def test_markdown_table_has_a_row_per_trial():
    records = [TrialRecord("t1", 0.1, DONE, {"finetune/train.lr": 0.001}, 12.345, 3, 4, "/c", "", "abc+", None, None),
               TrialRecord("t2", 0.1, ERROR, {"finetune/train.lr": 0.01}, None, None, 0, None, "ValueError: a|b",
                           "", None, None)]
    table = markdown_table(records, ["finetune/train.lr"], "segm_AP", title="x")
    lines = table.splitlines()
    assert lines[2] == ("| trial | status | segm_AP | epoch | epochs | finetune/train.lr | pretrain | checkpoint "
                        "| error |")
    assert lines[4] == "| t1 | done | 12.35 | 3 | 4 | 0.001 | abc+ | /c |  |"
    assert lines[5] == "| t2 | error |  |  | 0 | 0.01 |  |  | ValueError: a\\|b |"


def test_results_of_a_sweep_where_every_trial_failed(tmp_path):
    params = parse_space({"finetune": {"train.lr": {"grid": [0.1, 0.2]}}})
    records = [TrialRecord(f"t{i}", 0.1, ERROR, {"finetune/train.lr": lr}, None, None, 0, None, "ValueError: x", "",
                           None, None) for i, lr in enumerate((0.1, 0.2))]
    files = write_results(records, tmp_path, params=params, metric="segm_AP", sweep_name="s")
    assert "best_10" not in files and json.loads(files["best"].read_text()) == {}
    rows = files["table_10"].read_text().splitlines()[4:]
    assert [row.split(" | ")[1] for row in rows] == [ERROR, ERROR] and files["plot"].is_file()


def test_cli_prints_the_resolved_sweep_and_reports_bad_files(tmp_path, capsys):
    from sp_ray.cli import main

    assert main(["tune", "--config", str(CONFIGS / "tune" / "tiny_synthetic.yaml"), "--print-config",
                 "search.num_samples=3"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["search"]["num_samples"] == 3 and Path(printed["finetune_config"]).is_absolute()
    assert main(["tune", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "sweep file not found" in capsys.readouterr().err


# ---- tiny sweeps on a local Ray ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    return write_synthetic_dataset(tmp_path_factory.mktemp("synthetic"), num_images=12, image_size=64, seed=5)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One proposals / pre-training cache for every sweep here: the first sweep fills it."""
    return tmp_path_factory.mktemp("cache")


def statuses(outcome) -> dict[str, str]:
    return {r.trial_id: r.status for r in outcome.records}


def trial_record(outcome, trial_id: str) -> dict:
    return json.loads((outcome.experiment_dir / trial_id / "trial.json").read_text())


@pytest.mark.slow
def test_two_fractions_by_two_settings(local_ray, tiny_data, cache, tmp_path):
    path = write_sweep(tmp_path / "grid.yaml", tiny_data, cache=cache,
                       finetune={"train.epochs": 2, "train.lr": {"grid": [5e-4, 1e-3]}},
                       scheduler={"name": "asha", "grace_period": 1, "reduction_factor": 2},
                       tracking={"mlflow_tracking_uri": f"file:{tmp_path / 'mlruns'}"})
    outcome = run_sweep(load_sweep(path))
    assert outcome.complete and len(outcome.records) == 4
    # Each trial: an MLflow run of its sample and its epochs (Tune's MLflowLoggerCallback), TensorBoard files
    # of its fine-tuning with the val AP of each epoch it ran.
    client = MlflowClient(tracking_uri=f"file:{tmp_path / 'mlruns'}")
    runs = client.search_runs([client.get_experiment_by_name("grid").experiment_id])
    assert len(runs) == 4 and {r.info.status for r in runs} == {"FINISHED"}
    for record in outcome.records:
        [run] = [r for r in runs if record.trial_id in r.info.run_name]
        assert float(run.data.params["finetune/train.lr"]) == record.params["finetune/train.lr"]
        epochs = [m.step for m in client.get_metric_history(run.info.run_id, "segm_AP")]
        assert epochs and epochs == list(range(1, len(epochs) + 1))
        events = EventAccumulator(str(outcome.experiment_dir / record.trial_id / "finetune" / "tensorboard"))
        events.Reload()
        # A trial that ASHA stops may finish an epoch before the stop reaches it: that epoch is in its event
        # files but never reached Tune (nor its MLflow run). A trial that ran to the end has every epoch in both.
        evaluated = len(events.Scalars("val/segm_AP"))
        assert evaluated == len(epochs) if record.status == DONE else evaluated >= len(epochs)
    assert all(r.status in (DONE, STOPPED) and r.best is not None for r in outcome.records)
    assert sorted((r.fraction, r.params["finetune/train.lr"]) for r in outcome.records) == [
        (0.5, 5e-4), (0.5, 1e-3), (1.0, 5e-4), (1.0, 1e-3)]
    # Every trial has the same pre-training settings: one trial pre-trains, the other three find it cached.
    stages = [trial_record(outcome, r.trial_id) for r in outcome.records]
    assert len({s["pretrain"]["key"] for s in stages}) == 1
    assert sorted(s["pretrain"]["cached"] for s in stages) == [False, True, True, True]
    assert sorted(s["propose"]["cached"] for s in stages) == [False, True, True, True]
    for tag in ("50", "100"):
        table = outcome.files[f"table_{tag}"].read_text()
        assert table.count("| done |") + table.count("| stopped |") == 2
        csv_lines = outcome.files[f"csv_{tag}"].read_text().splitlines()
        assert len(csv_lines) == 3 and csv_lines[0].startswith("trial,fraction,status,segm_AP")
        best = load_config(outcome.files[f"best_{tag}"])  # the best config loads as a run config
        winner = json.loads(outcome.files["best"].read_text())[tag]
        assert best.train.lr == winner["params"]["finetune/train.lr"]
        assert best.data.train_annotations.endswith(f"train_{tag}pct_seed0.json")
        assert Path(winner["checkpoint"], "model.pt").is_file() and Path(winner["init"], "model.pt").is_file()
    assert outcome.files["plot"].stat().st_size > 0


@pytest.mark.slow
def test_a_failing_trial_is_recorded_and_the_others_finish(local_ray, tiny_data, cache, tmp_path):
    path = write_sweep(tmp_path / "fail.yaml", tiny_data, cache=cache, fractions=[1.0],
                       pretrain={"pretrain.prompt_rule": {"grid": ["cosine", "diagonal"]}},
                       finetune={"train.epochs": 1}, scheduler={"name": "fifo"})
    outcome = run_sweep(load_sweep(path))
    by_rule = {r.params["pretrain/pretrain.prompt_rule"]: r for r in outcome.records}
    assert by_rule["diagonal"].status == ERROR
    assert by_rule["diagonal"].error.startswith("ConfigError: pretrain.prompt_rule must be one of")
    assert by_rule["cosine"].status == DONE and by_rule["cosine"].best is not None
    rows = outcome.files["table_100"].read_text().splitlines()[4:]
    assert [row.split(" | ")[1] for row in rows] == [DONE, ERROR]  # scored trials first
    assert "| ConfigError: pretrain.prompt_rule must be one of" in rows[1] and rows[1].endswith("got 'diagonal' |")
    assert outcome.complete


def interrupt_when_the_second_trial_starts(experiment: Path) -> threading.Thread:
    """SIGUSR1 (Tune's 'stop the experiment, keep its state') once a second trial has started.

    With one trial at a time, the second one starts only after the first has ended.
    """

    def watch() -> None:
        deadline = time.time() + 900  # a trial takes ~20 s alone, minutes on a loaded 2-core machine
        while time.time() < deadline and len(list(experiment.glob("*/trial.json"))) < 2:
            time.sleep(0.2)
        os.kill(os.getpid(), signal.SIGUSR1)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


@pytest.mark.slow
def test_resume_runs_only_the_unfinished_trials(local_ray, tiny_data, cache, tmp_path):
    path = write_sweep(tmp_path / "resume.yaml", tiny_data, cache=cache, fractions=[1.0],
                       finetune={"train.epochs": 1, "train.lr": {"grid": [5e-4, 1e-3]}},
                       scheduler={"name": "fifo"},
                       resources={"cpus_per_worker": 0.9, "driver_cpus": 0.1, "max_concurrent_trials": 1})
    sweep = load_sweep(path)
    watcher = interrupt_when_the_second_trial_starts(sweep.experiment_dir)
    first = run_sweep(sweep)
    watcher.join()
    finished = {t for t, s in statuses(first).items() if s == DONE}
    assert not first.complete and len(finished) == 1
    with pytest.raises(ConfigError, match="exists: continue it with --resume"):
        run_sweep(sweep)

    resumed = run_sweep(sweep, resume=True)
    # The searcher makes a trial when a slot frees, so the interrupted run may not have made both yet.
    assert resumed.complete and set(statuses(first)) <= set(statuses(resumed))
    assert list(statuses(resumed).values()) == [DONE, DONE]
    for trial_id in statuses(resumed):
        starts = trial_record(resumed, trial_id)["starts"]
        assert len(starts) == 1 if trial_id in finished else len(starts) >= 1
    before = {r.trial_id: r.best for r in first.records}
    assert all(r.best == before[r.trial_id] for r in resumed.records if r.trial_id in finished)
