"""benchmarks/gpu_check.sh without a GPU: it leaves at once with one line and a non-zero status, writing nothing."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "gpu_check.sh"
BASH = shutil.which("bash") or "/bin/bash"


def run_check(tmp_path: Path, path: str) -> tuple[subprocess.CompletedProcess, float]:
    env = {"PATH": path, "HOME": str(tmp_path), "GPU_CHECK_OUT": str(tmp_path / "out"),
           "GPU_CHECK_WORK": str(tmp_path / "work"), "GPU_CHECK_PYTHON": sys.executable}
    start = time.perf_counter()
    done = subprocess.run([BASH, str(SCRIPT)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    return done, time.perf_counter() - start


def fake_nvidia_smi(folder: Path, *, works: bool) -> Path:
    """An ``nvidia-smi`` that lists a GPU, or fails as it does on a machine without a driver."""
    folder.mkdir()
    tool = folder / "nvidia-smi"
    body = 'echo "GPU 0: Fake GPU (UUID: GPU-0)"' if works else (
        'echo "NVIDIA-SMI has failed because it couldn\'t communicate with the NVIDIA driver."; exit 9')
    tool.write_text(f"#!{BASH}\n{body}\n")
    tool.chmod(0o755)
    return folder


def test_without_nvidia_smi_it_exits_at_once(tmp_path) -> None:
    empty = tmp_path / "bin"
    empty.mkdir()  # not even coreutils: the check must need bash alone
    done, seconds = run_check(tmp_path, str(empty))
    assert done.returncode == 3
    assert done.stderr == "gpu_check: no NVIDIA GPU here (nvidia-smi not found); nothing was run\n"
    assert done.stdout == "" and seconds < 5
    assert not (tmp_path / "out").exists() and not (tmp_path / "work").exists()


def test_a_failing_nvidia_smi_means_no_gpu(tmp_path) -> None:
    tools = fake_nvidia_smi(tmp_path / "bin", works=False)
    done, seconds = run_check(tmp_path, str(tools))
    assert done.returncode == 3 and seconds < 5
    assert done.stderr == ("gpu_check: no NVIDIA GPU here (nvidia-smi -L fails: no driver or no device); "
                           "nothing was run\n")
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine the script would run the whole check")
def test_a_gpu_torch_cannot_use_means_no_gpu(tmp_path) -> None:
    tools = fake_nvidia_smi(tmp_path / "bin", works=True)
    done, seconds = run_check(tmp_path, f"{tools}{os.pathsep}{os.environ['PATH']}")
    assert done.returncode == 3, done.stderr
    assert done.stderr == (f"gpu_check: no NVIDIA GPU here (torch.cuda.is_available() is false for {sys.executable}); "
                           "nothing was run\n")
    assert seconds < 60  # one `import torch`
    assert not (tmp_path / "out").exists() and not (tmp_path / "work").exists()
