"""Ray Train runs of the tiny config: DDP on a local Ray, two nodes, a worker failure, `ray job submit`, and the
Ray Train options (train.find_unused_parameters reaches DDP, train.checkpoint_upload=async resumes)."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import ray
import ray.cloudpickle
from mlflow.tracking import MlflowClient
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

from sp_ray.checkpoint import is_checkpoint, load_checkpoint
from sp_ray.config import dump_config, load_config
from sp_ray.data.synthetic import write_synthetic_dataset
from sp_ray.objectives import build_objective
from sp_ray.train.loop import fit
from sp_ray.train.ray_train import FAILURE_MARKER, UPLOAD_DIR, RaySession, run_training, setup_worker

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
DEMO_CONFIG = ROOT / "configs" / "demo" / "knet_tiny_synthetic.yaml"
TINY = ["data.max_size=64", "data.short_size=64", "model.num_kernels=8", "model.feat_channels=32",
        "model.ffn_channels=64", "model.num_heads=2", "model.num_stages=1", "train.batch_size=2",
        "train.warmup_iters=2"]

# The workers import this module's functions by value: the test folder is not on their path.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    return write_synthetic_dataset(tmp_path_factory.mktemp("synthetic"), num_images=10, image_size=64, seed=5)


def tiny_config(data, *extra):
    return load_config(DEMO_CONFIG, [f"data.train_annotations={data['train']}",
                                     f"data.train_images={data['images']}", *TINY, *extra])


def worker_records(work_dir: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((work_dir / "workers").glob("rank*.json"))]


# The tests that start clusters of their own come first: the module's `local_ray` (tests/conftest.py) stays
# up from its first test to the end of the module.
def test_two_nodes_on_one_machine(tiny_data, tmp_path):
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    cluster.add_node(num_cpus=1)
    assert not ray.is_initialized(), "this test runs before the local_ray tests of the module"
    try:
        ray.init(address=cluster.address)
        cfg = tiny_config(tiny_data, "train.epochs=1", "train.num_workers=2", "train.placement_strategy=SPREAD")
        run_training(cfg, tmp_path)
        records = worker_records(tmp_path)
        assert len({r["node_id"] for r in records}) == 2
        assert records[0]["param_checksum"] == pytest.approx(records[1]["param_checksum"], rel=1e-6)
    finally:
        ray.shutdown()
        cluster.shutdown()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ray_job_submit_against_a_head_on_loopback(tiny_data, tmp_path):
    bin_dir = Path(sys.executable).parent
    ray_cli = str(bin_dir / "ray")
    port, dashboard = free_port(), free_port()
    # Ray enables token authentication by default; name the mode so that the head and the job client agree.
    env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, "RAY_AUTH_MODE": "token"}
    # `--block` keeps the head's processes children of this one command, in a session of their own: stopping
    # that session stops this head alone, where `ray stop` would stop every Ray on the machine. Its own temp
    # dir keeps its address out of /tmp/ray/ray_current_cluster, which a later `ray.init()` here would join
    # (a short path: Ray's unix sockets live under it).
    ray_temp = Path(tempfile.mkdtemp(prefix="ray"))
    head = subprocess.Popen([ray_cli, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}",
                             f"--dashboard-port={dashboard}", "--dashboard-host=127.0.0.1", "--num-cpus=2",
                             f"--temp-dir={ray_temp}", "--disable-usage-stats"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        job_dir = tmp_path / "job"
        job_dir.mkdir()
        (job_dir / "tiny.yaml").write_text(dump_config(tiny_config(tiny_data)))
        overrides = ["train.epochs=1"]
        work_dir = tmp_path / "work"
        submit = [ray_cli, "job", "submit", f"--address=http://127.0.0.1:{dashboard}", "--working-dir",
                  str(job_dir), "--", str(bin_dir / "sp-ray"), "finetune", "--config", "tiny.yaml", "--work-dir",
                  str(work_dir), *overrides]
        # The dashboard and then the head's job agent come up some seconds after the head starts (longer on a
        # busy machine); until then a submission is refused, or answered "No available agent", which Ray itself
        # says to retry.
        for _ in range(24):
            done = subprocess.run(submit, env=env, capture_output=True, text=True, timeout=300)
            if done.returncode == 0 or not any(refusal in done.stdout + done.stderr for refusal in (
                    "No available agent", "Connection refused", "Failed to connect")):
                break
            assert head.poll() is None, f"the Ray head exited with code {head.returncode}"
            time.sleep(5)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        assert "succeeded" in done.stdout
        assert load_checkpoint(work_dir / "final").meta["epoch"] == 1
    finally:
        stop_session(head)
        shutil.rmtree(ray_temp, ignore_errors=True)


def stop_session(process: subprocess.Popen, grace_s: float = 60) -> None:
    """SIGTERM to the process's session (it shuts its Ray processes down), SIGKILL to what is left after grace_s."""
    group = process.pid  # start_new_session: the process leads its own group
    os.killpg(group, signal.SIGTERM)
    try:
        process.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(group, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait(timeout=30)


def test_two_workers_train_in_step(local_ray, tiny_data, tmp_path):
    cfg = tiny_config(tiny_data, "train.epochs=2", "train.num_workers=2")
    final = run_training(cfg, tmp_path)
    records = worker_records(tmp_path)
    assert [r["rank"] for r in records] == [0, 1]
    assert [(r["device"], r["backend"]) for r in records] == [("cpu", "gloo")] * 2  # NCCL with train.use_gpu
    # DDP keeps the replicas identical: both ranks end with the same parameters.
    assert records[0]["param_checksum"] == pytest.approx(records[1]["param_checksum"], rel=1e-6)
    assert load_checkpoint(final).meta["epoch"] == 2
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in lines] == [1, 2]
    # 8 train images, 2 per worker per step, 2 workers: 2 steps per epoch.
    assert lines[-1]["step"] == 4


def test_worker_failure_resumes_from_last_checkpoint(local_ray, tiny_data, tmp_path, monkeypatch):
    # With tracking: the relative MLflow store is made absolute on the driver (workers run elsewhere).
    monkeypatch.chdir(tmp_path)
    cfg = tiny_config(tiny_data, "train.epochs=4", "train.num_workers=2", "train.inject_failure_at_step=7",
                      "train.max_failures=1", "train.checkpoint_interval=2", "train.mlflow_tracking_uri=file:mlruns")
    final = run_training(cfg, tmp_path)
    assert (tmp_path / ".injected_failure_done").exists()
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    # Epoch 2 was the last checkpoint before the failure at step 7 (in epoch 4), epoch 3 was logged; the
    # restarted workers continue from epoch 2's checkpoint and log epoch 3 again in place of the old row,
    # so the log reads 1, 2, 3, 4 with no epoch lost or repeated.
    assert [m["epoch"] for m in lines] == [1, 2, 3, 4]
    assert [m["step"] for m in lines] == [2, 4, 6, 8]
    assert load_checkpoint(final).meta["step"] == 8
    # Rank 0's event files: the restarted run hides the steps it redoes (5-7), so every step is there once.
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == list(range(1, 9))
    assert [e.step for e in events.Scalars("epoch/loss")] == [2, 4, 6, 8]
    # One MLflow run over both attempts: every epoch in its history, epoch 3 logged by each attempt.
    # MLflow 3 opens a file: store only with this set; sp-ray sets it in the workers that wrote the store, and a
    # reader sets it too (the README's `mlflow ui` line), whatever ran before in this process.
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    client = MlflowClient(tracking_uri=f"file:{tmp_path / 'mlruns'}")
    [run] = client.search_runs([client.get_experiment_by_name("sp-ray").experiment_id])
    assert run.info.status == "FINISHED" and run.data.params["train.num_workers"] == "2"
    history = [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "loss")]
    assert sorted({step for step, _ in history}) == [1, 2, 3, 4]
    assert [value for step, value in history if step == 4] == [pytest.approx(lines[-1]["loss"])]
    assert "final/model.pt" in {a.path for a in client.list_artifacts(run.info.run_id, "final")}


def test_gpu_request_without_gpus_is_an_error(local_ray, tiny_data, tmp_path):
    with pytest.raises(ValueError, match="GPU"):
        run_training(tiny_config(tiny_data, "train.use_gpu=true", "train.epochs=1"), tmp_path)


def test_resume_path_that_is_not_a_checkpoint(tiny_data, tmp_path, capsys):
    from sp_ray.cli import main

    code = main(["finetune", "--config", str(DEMO_CONFIG), "--work-dir", str(tmp_path), "--resume-from",
                 str(tmp_path), f"data.train_annotations={tiny_data['train']}",
                 f"data.train_images={tiny_data['images']}"])
    assert code == 2
    assert f"--resume-from {tmp_path}: {tmp_path} is not a checkpoint directory" in capsys.readouterr().err


def with_unused_branch(cfg, model):
    """The fine-tuning objective plus a trained layer that no forward pass calls."""
    objective = build_objective(cfg, model)
    objective.unused_branch = nn.Linear(4, 4)
    return objective


def unused_branch_worker(loop_config):
    cfg, work_dir = setup_worker(loop_config)
    fit(cfg, work_dir, session=RaySession(cfg, work_dir), objective=with_unused_branch)


def test_find_unused_parameters_lets_ddp_train_an_unused_branch(local_ray, tiny_data, tmp_path):
    cfg = tiny_config(tiny_data, "train.epochs=1", "train.num_workers=2", "train.max_failures=0")
    # DDP's own error (it names the option; Ray cuts the middle of the message out)
    with pytest.raises(RuntimeError, match="Parameter indices which did not receive grad"):
        run_training(cfg, tmp_path / "off", worker=unused_branch_worker)
    on = tiny_config(tiny_data, "train.epochs=1", "train.num_workers=2", "train.max_failures=0",
                     "train.find_unused_parameters=true")
    final = run_training(on, tmp_path / "on", worker=unused_branch_worker)
    assert load_checkpoint(final).meta["step"] == 2  # 8 images, 2 workers x 2 per step
    records = [json.loads(p.read_text()) for p in sorted((tmp_path / "on" / "workers").glob("rank*.json"))]
    assert records[0]["param_checksum"] == pytest.approx(records[1]["param_checksum"], rel=1e-6)


def test_async_upload_resumes_from_the_uploaded_checkpoint(local_ray, tiny_data, tmp_path):
    # One worker, 8 images, batch 2: 4 steps per epoch; the worker fails once in epoch 3 (step 10) and the
    # restarted one continues from the last checkpoint Ray uploaded in the background.
    cfg = tiny_config(tiny_data, "train.epochs=3", "train.checkpoint_upload=async", "train.inject_failure_at_step=10",
                      "train.max_failures=1", f"train.storage_path={tmp_path / 'storage'}")
    final = run_training(cfg, tmp_path / "work", run_name="async")
    work = tmp_path / "work"
    failed_at = (work / FAILURE_MARKER).stat().st_mtime
    rows = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3] and rows[-1]["step"] == 12
    # Epoch 1's row was written before the failure and kept: the restart did not start over from scratch.
    assert rows[0]["time"] < failed_at
    assert load_checkpoint(final).meta["step"] == 12
    # The snapshots were uploaded, then deleted; WORK_DIR/last is the run's own and stays.
    uploaded = sorted(p.name for p in (tmp_path / "storage" / "async").glob("checkpoint_epoch=*") if is_checkpoint(p))
    assert uploaded[-1] == "checkpoint_epoch=0003"
    assert not any((work / UPLOAD_DIR).iterdir())
    assert is_checkpoint(work / "last")
