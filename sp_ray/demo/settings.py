"""What the demo runs and where it writes: sizes and schedules, the fine-tuning runs, the output layout."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sp_ray.data.split import fraction_tag

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "configs" / "demo"
SSL_CONFIG = CONFIGS / "densecl_tiny.yaml"
PRETRAIN_CONFIG = CONFIGS / "knet_tiny_sp_pretrain.yaml"
KNET_CONFIG = CONFIGS / "knet_tiny_synthetic.yaml"
MASKRCNN_CONFIG = CONFIGS / "maskrcnn_tiny_synthetic.yaml"
SPLIT_SEED = 0
# Detections kept per image by every fine-tuned model (eval.topk): the images hold at most 8 objects, and
# Mask R-CNN runs its mask head on every kept detection, so 100 would make its evaluation 5x dearer.
DETECTIONS_PER_IMAGE = 20


@dataclass(frozen=True)
class DemoSettings:
    """Sizes and schedules of the demo; the defaults are ``make demo``, `TINY` is the test suite's.

    The ``*_overrides`` are dotted config overrides added after the demo's own (model size, batch).
    """

    num_images: int = 400
    image_size: int = 160
    fractions: tuple[float, ...] = (0.05, 0.1)
    # The demo's unlabeled pool is its 320 train images, where benchmarks/low_data.py adds 2000 more: the
    # larger pool's DenseCL and proposals alone would take 20 minutes. DenseCL sees 10 x 320 images (the
    # benchmark 4 x 2320) and SP pre-training 8 x 320 (3 x 2320), with the same configs and lr steps scaled
    # to the epochs. 20 and 12 epochs gave a larger SP gain (+8.2 / +4.5 AP against +2.1 / +1.8 at 5% / 10%)
    # but took the demo to 20 minutes on a 2-core Intel Xeon (DenseCL alone 357 s of one core).
    ssl_epochs: int = 10
    # Backbone input side of propose: 16 x 16 C5 cells for the 160 px images, the size the benchmark's probe
    # picks by recall@0.5 of the labeled-train instances.
    propose_size: int = 512
    propose_shard: int = 32  # images per propose shard (the unit of the progress bar and of a resumed run)
    pretrain_epochs: int = 8
    pretrain_workers: int = 2
    finetune_epochs: int = 40
    eval_interval: int = 5
    # Mask R-CNN trains at 0.4 images/s against K-Net's 8.5 on a CPU core: its two 2-epoch runs took 215 s
    # of the fine-tuning step's 455 on the Xeon, and at 2 or 4 epochs its AP stays below 1.5 either way.
    maskrcnn_epochs: int = 1
    kernel_images: int = 80
    sample_images: int = 4
    throughput_warmup: int = 2
    throughput_repeats: int = 10
    onnx_threads: int = 1
    ssl_overrides: tuple[str, ...] = ()
    propose_overrides: tuple[str, ...] = ()
    knet_overrides: tuple[str, ...] = ()  # pre-training and K-Net fine-tuning (one K-Net architecture)
    maskrcnn_overrides: tuple[str, ...] = ()


_TINY_KNET = ("data.max_size=64", "data.short_size=64", "model.num_kernels=8", "model.feat_channels=32",
              "model.ffn_channels=64", "model.num_heads=2", "model.num_stages=1", "train.batch_size=2",
              "train.warmup_iters=2", "eval.batch_size=4")
# The whole pipeline in about a minute of CPU: what the test suite runs (`sp-ray demo --tiny`).
TINY = DemoSettings(
    num_images=24, image_size=64, ssl_epochs=1, propose_size=128, propose_shard=8, pretrain_epochs=1,
    finetune_epochs=2, eval_interval=1, maskrcnn_epochs=1, kernel_images=4, sample_images=2,
    throughput_warmup=1, throughput_repeats=2,
    ssl_overrides=("ssl.batch_size=4", "ssl.queue_size=16", "ssl.hidden_dim=32", "ssl.image_size=32"),
    knet_overrides=_TINY_KNET,
    maskrcnn_overrides=("data.max_size=64", "data.short_size=64", "train.batch_size=2", "train.warmup_iters=2",
                        "eval.batch_size=4"),
)


@dataclass(frozen=True)
class Run:
    """One fine-tuning run: ``variant`` "scratch" or "sp" (K-Net) or "maskrcnn", on ``fraction`` of train."""

    variant: str
    fraction: float

    @property
    def name(self) -> str:
        return f"{self.variant}_{fraction_tag(self.fraction)}pct"

    @property
    def config(self) -> Path:
        return MASKRCNN_CONFIG if self.variant == "maskrcnn" else KNET_CONFIG


VARIANTS = ("scratch", "sp", "maskrcnn")
VARIANT_TITLES = {"scratch": "K-Net from scratch", "sp": "K-Net from SP", "maskrcnn": "Mask R-CNN"}


def demo_runs(settings: DemoSettings) -> list[Run]:
    """Every fine-tuning run, fractions ascending."""
    return [Run(variant, fraction) for fraction in sorted(settings.fractions) for variant in VARIANTS]


@dataclass(frozen=True)
class DemoLayout:
    """Every path the demo reads or writes, under ``root``."""

    root: Path

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def images(self) -> Path:
        return self.data / "images"

    @property
    def train_json(self) -> Path:
        return self.data / "train.json"

    @property
    def val_json(self) -> Path:
        return self.data / "val.json"

    @property
    def splits(self) -> Path:
        return self.root / "splits"

    def split(self, fraction: float) -> Path:
        return self.splits / f"train_{fraction_tag(fraction)}pct_seed{SPLIT_SEED}.json"

    @property
    def train_images(self) -> Path:
        return self.root / "train_images"  # symlinks to the train images: `sp-ray ssl` reads a folder

    @property
    def ssl(self) -> Path:
        return self.root / "ssl"

    @property
    def backbone(self) -> Path:
        from sp_ray.densecl.train import BACKBONE_FILE

        return self.ssl / "final" / BACKBONE_FILE

    @property
    def pseudo(self) -> Path:
        return self.root / "pseudo"

    @property
    def pseudo_summary(self) -> Path:
        return self.pseudo / "summary.json"

    @property
    def pretrain(self) -> Path:
        return self.root / "sp_pretrain"

    @property
    def finetune(self) -> Path:
        return self.root / "finetune"

    def run(self, run: Run) -> Path:
        return self.finetune / run.name

    @property
    def eval(self) -> Path:
        return self.root / "eval"

    def metrics(self, run: Run) -> Path:
        return self.eval / run.name / "metrics.json"

    @property
    def kernels(self) -> Path:
        return self.root / "kernels"

    @property
    def export(self) -> Path:
        return self.root / "export"

    def onnx(self, run: Run) -> Path:
        return self.export / f"{run.name}.onnx"

    @property
    def onnx_eval(self) -> Path:
        return self.root / "onnx"

    @property
    def throughput(self) -> Path:
        return self.root / "throughput.json"

    @property
    def figures(self) -> Path:
        return self.root / "figures"

    @property
    def steps(self) -> Path:
        return self.root / "steps.json"


def kernel_checkpoints(layout: DemoLayout, settings: DemoSettings) -> dict[str, Path]:
    """The K-Net checkpoints whose kernels are drawn: from scratch, SP pre-trained, fine-tuned from SP."""
    largest = max(settings.fractions)
    return {
        f"scratch_{fraction_tag(largest)}pct": layout.run(Run("scratch", largest)) / "final",
        "sp_pretrain": layout.pretrain / "final",
        f"sp_{fraction_tag(largest)}pct": layout.run(Run("sp", largest)) / "final",
    }


def exported_runs(settings: DemoSettings) -> list[Run]:
    """The runs exported to ONNX: K-Net from SP and Mask R-CNN, on the largest fraction."""
    return [Run("sp", max(settings.fractions)), Run("maskrcnn", max(settings.fractions))]
