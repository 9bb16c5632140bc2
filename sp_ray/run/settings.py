"""What a run computes and where it writes: its data, preset, model family, variants, schedules, the fine-tuning
runs and the output layout.

`RunSettings` is the whole run (``sp-ray run`` builds one from its flags, ``sp-ray demo`` uses
`sp_ray.demo.settings.DEMO` / ``TINY``); `Layout` names every path under the output folder.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sp_ray.data.split import fraction_tag

REPO = Path(__file__).resolve().parents[2]
FAMILIES = ("knet", "mask2former", "queryinst")
FAMILY_TITLES = {"knet": "K-Net", "mask2former": "Mask2Former", "queryinst": "QueryInst"}
BASELINES = ("maskrcnn",)
PRESETS = ("tiny", "r50")
# The fine-tuning variants: the model family from scratch, from the self-supervised backbone alone ("ssl",
# the same backbone as SP without SP pre-training), from SP pre-training, and the Mask R-CNN baseline.
VARIANTS = ("scratch", "ssl", "sp", "maskrcnn")
# Scopes of the KEY=VALUE overrides (``STEP:KEY=VALUE``): the configs a run resolves.
OVERRIDE_SCOPES = ("ssl", "propose", "pretrain", "finetune", "baseline")


@dataclass(frozen=True)
class Preset:
    """The config files a run starts from; the run's settings and overrides are applied on top."""

    name: str
    ssl: Path
    propose: Path
    pretrain: Path
    finetune: Path
    baseline: Path


def preset(name: str, family: str) -> Preset:
    """``tiny``: the CPU-sized configs of configs/demo/; ``r50``: the paper's ResNet-50 configs of configs/.

    Raises:
        ValueError: an unknown preset or family.
    """
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; the presets are {', '.join(PRESETS)}")
    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}; the families are {', '.join(FAMILIES)}")
    configs = REPO / "configs"
    if name == "tiny":
        demo = configs / "demo"
        return Preset(name, demo / "densecl_tiny.yaml", demo / "propose_tiny.yaml",
                      demo / f"{family}_tiny_sp_pretrain.yaml", demo / f"{family}_tiny_synthetic.yaml",
                      demo / "maskrcnn_tiny_synthetic.yaml")
    return Preset(name, configs / "densecl_r50.yaml", configs / "propose_r50.yaml",
                  configs / f"{family}_r50_sp_pretrain.yaml", configs / f"{family}_r50_coco_finetune.yaml",
                  configs / "maskrcnn_r50_coco_finetune.yaml")


@dataclass(frozen=True)
class SyntheticData:
    """The built-in synthetic shapes (`write_synthetic_dataset`, seed 0): its own train / val split."""

    num_images: int = 400
    image_size: int = 160


@dataclass(frozen=True)
class UserData:
    """A COCO-format labeled set, an optional val set and unlabeled folders (``sp-ray run``).

    Without ``val_annotations``, ``val_fraction`` of the usable labeled images (seeded by ``val_seed``) are
    held out as val; without ``unlabeled``, the train images (without their labels) are the unlabeled pool.
    """

    annotations: Path
    images: Path
    val_annotations: Path | None = None
    val_images: Path | None = None
    unlabeled: tuple[Path, ...] = ()
    val_fraction: float = 0.2
    val_seed: int = 0


@dataclass(frozen=True)
class RunSettings:
    """Everything a run computes. A schedule left None is the preset config's own.

    The ``*_overrides`` are dotted config overrides of one config each, applied after the run's own
    (data paths, schedule): ``ssl`` (DenseCL), ``propose``, ``pretrain`` (SP), ``finetune`` (every run of the
    model family) and ``baseline`` (Mask R-CNN).
    """

    data: SyntheticData | UserData
    preset: str = "tiny"
    family: str = "knet"
    variants: tuple[str, ...] = ("ssl", "sp")
    fractions: tuple[float, ...] = (0.05, 0.1)
    split_seed: int = 0
    backbone_weights: Path | None = None  # a local backbone file: DenseCL does not run
    use_gpu: bool = False
    pretrain_workers: int = 2  # Ray Train workers of SP pre-training (and of every fine-tuning run with use_gpu)
    ssl_epochs: int | None = None
    propose_size: int | None = None  # square backbone input of propose (keep_ratio off); None: the config's
    propose_shard: int | None = None  # images per propose shard (the unit of a resumed run)
    propose_actors: int | None = None
    pretrain_epochs: int | None = None
    finetune_epochs: int | None = None
    eval_interval: int | None = None  # val AP every N epochs of the model family's runs
    maskrcnn_epochs: int | None = None
    detections_per_image: int | None = None  # eval.topk of every fine-tuned model
    kernel_images: int = 80
    sample_images: int = 4
    throughput_warmup: int = 2
    throughput_repeats: int = 10
    onnx_threads: int = 1
    ssl_overrides: tuple[str, ...] = ()
    propose_overrides: tuple[str, ...] = ()
    pretrain_overrides: tuple[str, ...] = ()
    finetune_overrides: tuple[str, ...] = ()
    baseline_overrides: tuple[str, ...] = ()
    # The sp-ray arguments that make these settings, without --out / --force / --redo: the report's commands.
    invocation: tuple[str, ...] = ("run",)

    def __post_init__(self) -> None:
        preset(self.preset, self.family)  # raises on an unknown name
        unknown = [v for v in self.variants if v not in VARIANTS]
        if unknown or "sp" not in self.variants:
            raise ValueError(f"variants {self.variants}: they must include 'sp' and be among {', '.join(VARIANTS)}")
        if not self.fractions:
            raise ValueError("fractions is empty; give at least one labeled fraction in (0, 1]")

    @property
    def configs(self) -> Preset:
        return preset(self.preset, self.family)

    @property
    def runs_ssl(self) -> bool:
        """DenseCL runs (no ``backbone_weights`` given)."""
        return self.backbone_weights is None

    @property
    def reference(self) -> str | None:
        """The variant SP is compared with: the same model without SP pre-training."""
        return next((v for v in ("ssl", "scratch") if v in self.variants), None)

    @property
    def baseline(self) -> str | None:
        return "maskrcnn" if "maskrcnn" in self.variants else None


def variant_title(variant: str, family: str = "knet") -> str:
    """The report's name of a variant: "K-Net from SP", "K-Net without SP", "Mask R-CNN", ..."""
    if variant == "maskrcnn":
        return "Mask R-CNN"
    suffix = {"scratch": "from scratch", "ssl": "without SP", "sp": "from SP"}[variant]
    return f"{FAMILY_TITLES[family]} {suffix}"


@dataclass(frozen=True)
class Run:
    """One fine-tuning run: a variant of `VARIANTS` on ``fraction`` of the labeled train images."""

    variant: str
    fraction: float

    @property
    def name(self) -> str:
        return f"{self.variant}_{fraction_tag(self.fraction)}pct"

    def config(self, settings: RunSettings) -> Path:
        """The preset config the run starts from."""
        return settings.configs.baseline if self.variant == "maskrcnn" else settings.configs.finetune


def fine_tuning_runs(settings: RunSettings) -> list[Run]:
    """Every fine-tuning run, fractions ascending, variants in `VARIANTS` order."""
    variants = [v for v in VARIANTS if v in settings.variants]
    return [Run(variant, fraction) for fraction in sorted(settings.fractions) for variant in variants]


@dataclass(frozen=True)
class Layout:
    """Every path a run reads or writes, under ``root``.

    The labeled images stay where they are: ``train_images`` / ``val_images`` (default: the synthetic
    set's ``root/data/images``) are the folders the json files of ``data/`` name their images in.
    """

    root: Path
    train_images_dir: Path | None = None
    val_images_dir: Path | None = None
    backbone_file: Path | None = None  # a given backbone (no DenseCL); default: ssl/final/backbone.pth

    @classmethod
    def of(cls, root: str | Path, settings: RunSettings) -> Layout:
        """The layout of ``settings`` under ``root`` (made absolute: Ray workers run in other directories)."""
        root = Path(root).resolve()
        weights = settings.backbone_weights.resolve() if settings.backbone_weights is not None else None
        data = settings.data
        if isinstance(data, UserData):
            images = data.images.resolve()
            val = (data.val_images or data.images).resolve() if data.val_annotations is not None else images
            return cls(root, images, val, weights)
        return cls(root, backbone_file=weights)

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def images(self) -> Path:
        return self.data / "images"  # the synthetic set's images

    @property
    def train_images(self) -> Path:
        return self.train_images_dir or self.images

    @property
    def val_images(self) -> Path:
        return self.val_images_dir or self.images

    @property
    def train_json(self) -> Path:
        return self.data / "train.json"

    @property
    def val_json(self) -> Path:
        return self.data / "val.json"

    @property
    def data_summary(self) -> Path:
        return self.data / "summary.json"

    @property
    def unlabeled(self) -> Path:
        return self.data / "unlabeled"  # symlinks to the unlabeled pool: DenseCL and propose read a folder

    @property
    def configs(self) -> Path:
        return self.root / "configs"

    def config(self, name: str) -> Path:
        """The resolved config of a step (ssl, propose, pretrain) or fine-tuning run (finetune_<run>)."""
        return self.configs / f"{name}.yaml"

    def run_config(self, run: Run) -> Path:
        return self.config(f"finetune_{run.name}")

    @property
    def splits(self) -> Path:
        return self.root / "splits"

    def split(self, fraction: float, seed: int = 0) -> Path:
        return self.splits / f"train_{fraction_tag(fraction)}pct_seed{seed}.json"

    @property
    def ssl(self) -> Path:
        return self.root / "ssl"

    @property
    def backbone(self) -> Path:
        from sp_ray.densecl.train import BACKBONE_FILE

        return self.backbone_file or self.ssl / "final" / BACKBONE_FILE

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


def main_run(settings: RunSettings) -> Run:
    """The run the report details (per-category AP, ONNX): the model family from SP, largest fraction."""
    return Run("sp", max(settings.fractions))


def kernel_checkpoints(layout: Layout, settings: RunSettings) -> dict[str, Path]:
    """The checkpoints whose kernels are drawn: without SP, SP pre-trained, fine-tuned from SP (largest fraction)."""
    largest = max(settings.fractions)
    found = {}
    if settings.reference is not None:
        reference = Run(settings.reference, largest)
        found[reference.name] = layout.run(reference) / "final"
    found["sp_pretrain"] = layout.pretrain / "final"
    found[main_run(settings).name] = layout.run(main_run(settings)) / "final"
    return found


def exported_runs(settings: RunSettings) -> list[Run]:
    """The runs exported to ONNX: the model family from SP and the baseline (if any), largest fraction."""
    runs = [main_run(settings)]
    if settings.baseline is not None:
        runs.append(Run(settings.baseline, max(settings.fractions)))
    return runs
