"""benchmarks/low_data.py at its tiniest: the whole protocol runs and writes the paired intervals."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from sp_ray.demo.settings import TINY

REPO = Path(__file__).resolve().parents[2]
# The tiny sizes of `sp-ray demo --tiny`: seconds per run on a CPU.
TINY_SSL, TINY_KNET = TINY.ssl_overrides, TINY.finetune_overrides


@pytest.mark.slow
def test_tiniest_protocol_writes_paired_intervals(tmp_path: Path) -> None:
    out = tmp_path / "low_data"
    command = [
        sys.executable, str(REPO / "benchmarks" / "low_data.py"), "--out", str(out), "--num-images", "24",
        "--image-size", "64", "--pool-images", "16", "--fractions", "0.25", "--split-seeds", "0",
        "--train-seeds", "0", "1", "--epochs", "2", "--eval-every", "1", "--ssl-epochs", "1",
        "--pretrain-epochs", "1", "--pretrain-workers", "1", "--propose-sizes", "64", "96",
        "--ssl-override", *TINY_SSL, "--pretrain-override", *TINY_KNET, "--finetune-override", *TINY_KNET,
    ]
    # RAY_ADDRESS=local: pre-training starts (and stops) its own local Ray, never joins another one.
    env = {**os.environ, "RAY_ADDRESS": "local", "PYTHONPATH": str(REPO)}
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-4000:]
    result = json.loads((out / "low_data.json").read_text())

    # 16 pool images join the 19 labeled-train images (80% of 24) as the unlabeled pool.
    assert result["sizes"] == {"labeled_train": 19, "unlabeled_pool": 35}
    assert result["propose_size"] in (64, 96) and set(result["proposal_quality"]) == {
        "labeled train at 64 px", "labeled train at 96 px", "saliency"}
    # The crossed design: training seed 1 of split 0 runs under the AVX2 kernels, and says so.
    assert [run["tag"] for run in result["runs"]] == ["split0_seed0", "split0_seed1_isa_avx2"]
    arithmetic = json.loads((out / "finetune" / "sp_25pct_split0_seed1_isa_avx2" / "arithmetic.json").read_text())
    assert arithmetic["cpu_capability"] == "AVX2" and arithmetic["threads"] == 1

    assert set(result["table"]) == {"scratch@0.25", "ssl@0.25", "sp@0.25"}
    for row in result["table"].values():
        assert len(row["AP_per_run"]) == 2 and all(0.0 <= ap <= 100.0 for ap in row["AP_per_run"])
        assert row["AP"] == pytest.approx(statistics.fmean(row["AP_per_run"]))
    pairs = {(c["high"], c["low"]): c for c in result["comparisons"]}
    assert set(pairs) == {("ssl", "scratch"), ("sp", "ssl"), ("sp", "scratch")}
    for (high, low), compared in pairs.items():
        for metric in ("AP", "AUC"):
            d = compared[metric]
            differences = [h - lo for h, lo in zip(result["table"][f"{high}@0.25"][f"{metric}_per_run"],
                                                   result["table"][f"{low}@0.25"][f"{metric}_per_run"], strict=True)]
            assert d["n"] == 2 and d["mean"] == pytest.approx(statistics.fmean(differences))
            # Two pairs: the exact bootstrap's interval runs from the smaller difference to the larger.
            assert d["ci_low"] == pytest.approx(min(differences)) and d["ci_high"] == pytest.approx(max(differences))
            assert d["verdict"] in ("above 0", "below 0", "includes 0")
    assert "Paired differences" in (out / "low_data.md").read_text()
    assert (out / "low_data.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def low_data():
    spec = importlib.util.spec_from_file_location("low_data", REPO / "benchmarks" / "low_data.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["low_data"] = module  # its dataclasses look their module up there
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        del sys.modules["low_data"]


def test_control_and_iuq_variants_are_compared_in_pairs(low_data) -> None:
    variants = ["sp", "sp_selftrain", "sp_continued", "sp_iuq", "sp_iuq_consistency"]
    args = argparse.Namespace(fractions=[0.1], variants=variants)
    per_run = {"sp": [1.0, 2.0], "sp_selftrain": [3.0, 5.0], "sp_continued": [2.0, 2.0], "sp_iuq": [1.0, 1.0],
               "sp_iuq_consistency": [0.0, 2.0]}  # fmt: skip
    table = {f"{v}@0.1": {"AP_per_run": runs, "AUC_per_run": runs} for v, runs in per_run.items()}
    found = {(c["high"], c["low"]): c["AP"]["mean"] for c in low_data.comparisons(table, args)}
    # Each extra variant against sp, then the self-training round against its control and the two IUQ forms.
    assert found == {("sp_selftrain", "sp"): 2.5, ("sp_continued", "sp"): 0.5, ("sp_iuq", "sp"): -0.5,
                     ("sp_iuq_consistency", "sp"): -0.5, ("sp_selftrain", "sp_continued"): 2.0,
                     ("sp_iuq", "sp_iuq_consistency"): 0.0}  # fmt: skip
    # Without the control in --variants its pair is left out.
    args.variants = ["sp", "sp_selftrain"]
    assert [(c["high"], c["low"]) for c in low_data.comparisons(table, args)] == [("sp_selftrain", "sp")]


def test_variant_settings(low_data, tmp_path: Path) -> None:
    args = argparse.Namespace(epochs=2, eval_every=1, finetune_override=[])

    def overrides(variant: str) -> list[str]:
        return low_data.finetune_overrides(args, variant, tmp_path / "split.json", tmp_path, 0, tmp_path / "b.pth")

    iuq = ["iuq.inter_scene_weight=0.3", "iuq.equivariance_mask_weight=0.3", "iuq.equivariance_feature_weight=0.3"]
    assert overrides("sp_iuq")[-4:] == [*iuq, "iuq.equivariance_target=ground_truth"]
    assert overrides("sp_iuq_consistency")[-4:] == [*iuq, "iuq.equivariance_target=consistency"]
    assert not any(o.startswith("iuq.") for o in overrides("sp_continued") + overrides("sp"))
    # Both IUQ forms fine-tune from plain SP; the control has a pre-training of its own, as self-training has.
    assert low_data.PRETRAINING_OF["sp_iuq"] == low_data.PRETRAINING_OF["sp_iuq_consistency"] == "sp"
    assert low_data.PRETRAINING_OF["sp_continued"] == "sp_continued"
