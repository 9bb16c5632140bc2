"""A user error inside a Ray Train worker ends the run at once; Ctrl-C says how to resume, and resuming loses nothing.

Both run ``sp-ray finetune`` in this process on the module's local Ray (tests/conftest.py).
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import threading
import time

import pytest

from sp_ray.checkpoint import load_checkpoint
from sp_ray.cli import main
from sp_ray.data.synthetic import write_synthetic_dataset

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_synthetic_dataset(tmp_path_factory.mktemp("synthetic"), num_images=8, image_size=64, seed=4)


def test_a_user_error_in_a_worker_is_not_retried(local_ray, tiny_knet_cli, data, tmp_path, capsys):
    # Diverging weights are found only in the worker (the matcher refuses NaN outputs at the second step).
    # With train.max_failures=-1 Ray retries a failure without end, so the run ends only if it is not retried.
    argv = tiny_knet_cli.finetune_argv(data, tmp_path, "train.epochs=2", "train.lr=1e30", "train.grad_clip=0",
                                       "train.warmup_iters=0", "train.max_failures=-1")
    outcome: list[int] = []
    runner = threading.Thread(target=lambda: outcome.append(main(argv)), daemon=True)
    runner.start()
    runner.join(timeout=300)
    assert outcome == [2], "the run did not end: the user error was retried"
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("sp-ray finetune: error:")]
    assert len(errors) == 1 and "not finite" in errors[0] and "lower train.lr" in errors[0], errors
    assert not (tmp_path / "final").exists()


def test_relative_data_paths_reach_the_workers(local_ray, tiny_knet_cli, data, tmp_path, monkeypatch, capsys):
    # The driver's checks read data/train.json from its directory; the Ray workers run elsewhere and
    # once failed on the same relative path as a fault (retried, exit 1 after a minute).
    monkeypatch.chdir(data["train"].parent)
    relative = {"train": data["train"].name, "images": data["images"].name}
    argv = tiny_knet_cli.finetune_argv(relative, tmp_path / "run", "train.epochs=1", "train.max_failures=0")
    assert main(argv) == 0, capsys.readouterr().err[-2000:]
    assert (tmp_path / "run" / "final" / "model.pt").is_file()


def test_sigint_prints_the_resume_command_and_resuming_logs_each_epoch_once(local_ray, tiny_knet_cli, data,
                                                                                tmp_path, capsys):
    work_dir = tmp_path / "run"
    # Checkpoints every 2 epochs, so the interrupted run has usually logged epochs past its last checkpoint.
    argv = tiny_knet_cli.finetune_argv(data, work_dir, "train.epochs=60", "train.checkpoint_interval=2")

    def interrupt_after_the_first_checkpoint() -> None:
        deadline = time.monotonic() + 300
        while not (work_dir / "last").is_dir() and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(2)
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C of the driver

    threading.Thread(target=interrupt_after_the_first_checkpoint, daemon=True).start()
    assert main(argv) == 130
    hints = [line for line in capsys.readouterr().err.splitlines() if line.startswith("sp-ray finetune: interrupted;")]
    assert len(hints) == 1, hints
    assert f"continue it from {work_dir / 'last'} with: sp-ray " in hints[0]
    resume_argv = shlex.split(hints[0].split(" with: sp-ray ", 1)[1])
    assert resume_argv == [*argv, "--resume"]

    epoch = load_checkpoint(work_dir / "last", with_training_state=True).training_state["epoch"]
    assert epoch < 60, "the run finished before the interrupt"
    # The hint's command, with an override after --resume (taken as an override, not as the flag's argument).
    assert main([*resume_argv, f"train.epochs={epoch + 1}"]) == 0
    rows = [json.loads(line) for line in (work_dir / "metrics.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in rows] == list(range(1, epoch + 2))
    per_epoch = rows[0]["step"]
    assert [row["step"] for row in rows] == [per_epoch * e for e in range(1, epoch + 2)]
    meta = load_checkpoint(work_dir / "final").meta
    assert meta["epoch"] == epoch + 1 and meta["step"] == per_epoch * (epoch + 1)
