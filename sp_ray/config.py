"""Typed configuration: dataclass defaults, YAML files that list differences, dotted overrides.

A YAML file may name one or more parents with ``_base_`` (paths relative to the file); parents are
merged first, the file's own keys win. Every key of every file is checked against the dataclasses
before merging, so an error names the file and the dotted key. Command-line overrides
(``model.num_kernels=16``) are parsed as YAML scalars and checked the same way.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import math
import re
import types
import typing
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from sp_ray.errors import UserError

T = TypeVar("T")


class ConfigError(UserError):
    """A config file or override that does not fit the schema, or a value out of its range."""


class _YamlLoader(yaml.SafeLoader):
    """SafeLoader that also reads ``1e-4`` as a float (YAML 1.1 wants ``1.0e-4``)."""


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*\.?[0-9_]*|\.[0-9_]+)(?:[eE][-+]?[0-9]+)$"),
    list("-+0123456789."),
)


def _safe_load(text: Any) -> Any:
    loader = _YamlLoader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


@dataclass
class ModelConfig:
    name: str = "knet"  # key of sp_ray.models.FAMILIES: knet, mask2former, queryinst, maskrcnn
    depth: int = 50  # ResNet depth: 18, 34 or 50
    backbone_weights: str | None = None  # local file (torchvision, MoCo-v2 or DenseCL layout); None = random init
    frozen_stages: int = 1  # mmdet semantics: -1 none, 0 stem, 1 stem+layer1, ..., 4 the whole ResNet
    norm_eval: bool = True  # frozen BatchNorm statistics (small per-GPU batches make BN statistics noise)
    num_classes: int = 0  # 0 = the number of categories of the training annotations
    num_kernels: int = 100
    num_stages: int = 3
    feat_channels: int = 256
    ffn_channels: int = 2048
    num_heads: int = 8
    # Mask2Former's pixel decoder; its queries are num_kernels, its decoder layers num_stages (9 in the paper)
    # and its decoder FFN width ffn_channels.
    encoder_layers: int = 6  # deformable-attention encoder layers
    encoder_ffn_channels: int = 1024  # their FFN hidden width
    deform_points: int = 4  # sampling points per head and level of the deformable attention
    # QueryInst; its queries are num_kernels and its dynamic stages num_stages (6 in the paper).
    dynamic_channels: int = 64  # hidden width of its dynamic instance / mask interaction (DynamicConv)


@dataclass
class LossConfig:
    # K-Net's weights (METHODS.md section 5); the matcher costs mirror the loss weights.
    cls_weight: float = 2.0
    mask_weight: float = 1.0
    dice_weight: float = 4.0
    init_mask_weight: float = 1.0
    init_dice_weight: float = 4.0
    cost_class: float = 2.0
    cost_dice: float = 4.0
    cost_mask: float = 1.0
    # "full": BCE + dice on the whole target mask (K-Net). "weak": FreeSOLO's losses for noisy pseudo masks
    # (sp_ray.models.weak_mask_losses), which see a target only through its x/y projections and its box:
    # max-projection dice, average-projection dice and the LAB colour-affinity pairwise term. K-Net only.
    mask_loss: str = "full"
    projection_weight: float = 4.0  # max-projection dice (FreeSOLO: the dice weight x 1.0)
    avg_projection_weight: float = 0.4  # average-projection dice (FreeSOLO: the dice weight x 0.1)
    pairwise_weight: float = 1.0  # colour-affinity pairwise term (BoxInst / FreeSOLO: 1.0)
    pairwise_color_threshold: float = 0.3  # pairs count where exp(-||LAB_i - LAB_j|| / 2) >= this
    pairwise_warmup_iters: int = 1000  # the pairwise weight ramps up linearly over this many criterion calls
    # Mask2Former (cls/mask/dice weights and costs above; its paper values are 2 / 5 / 5, every layer alike).
    no_object_weight: float = 0.1  # class weight of "no object" in the softmax cross-entropy
    num_points: int = 12544  # points per mask for the matching costs and the mask losses (112 x 112)
    oversample_ratio: float = 3.0  # candidate points per kept point of the importance sampling
    importance_sample_ratio: float = 0.75  # share of the points taken where the prediction is most uncertain
    # QueryInst's box terms (Sparse R-CNN: focal 2 = cls_weight, L1 5, GIoU 2; the same values as matching
    # costs, cost_class for the class). Its RoI masks take mask_weight (BCE) and dice_weight (paper: dice 8).
    l1_weight: float = 5.0  # L1 of boxes normalised by the image size
    giou_weight: float = 2.0
    cost_l1: float = 5.0
    cost_giou: float = 2.0


@dataclass
class DataConfig:
    train_annotations: str = ""
    train_images: str = ""
    val_annotations: str = ""  # empty: no evaluation during training
    val_images: str = ""
    max_size: int = 1333  # long side cap of the keep-ratio resize
    short_size: int = 800  # short side target of the keep-ratio resize
    flip_prob: float = 0.5
    train_scale_range: list[float] = field(default_factory=lambda: [1.0, 1.0])  # multi-scale jitter of both sizes
    size_divisor: int = 32
    num_workers: int = 2  # DataLoader worker processes per training process
    # Images with more pixels (H x W) are skipped and counted by every reader (datasets, evaluate,
    # propose); PIL's decompression-bomb threshold, export.geometry.MAX_IMAGE_PIXELS (about 9459 x 9459).
    max_image_pixels: int = 89_478_485


@dataclass
class TrainConfig:
    epochs: int = 48
    batch_size: int = 2  # images per training process; the global batch is batch_size x workers
    lr: float = 1e-4  # for the global batch of the config; see README for the scaling rule
    weight_decay: float = 0.05
    backbone_lr_mult: float = 0.25
    # Weight-decay factors (mmdet's paramwise_cfg): of normalisation layers (BatchNorm, GroupNorm, LayerNorm)
    # and of learned embeddings (nn.Embedding tables, parameters named *_embed); Mask2Former sets both to 0.
    norm_decay_mult: float = 1.0
    embed_decay_mult: float = 1.0
    grad_clip: float = 4.0  # max gradient norm; 0 disables clipping
    lr_schedule: str = "step"  # "step" (decay by lr_gamma at lr_steps epochs) or "cosine"
    lr_steps: list[int] = field(default_factory=lambda: [36, 44])
    lr_gamma: float = 0.1
    warmup_iters: int = 100
    warmup_ratio: float = 1e-3
    seed: int = 0
    use_gpu: bool = False
    amp: bool = True  # bf16 autocast, on CUDA only
    log_interval: int = 20  # iterations between log lines
    checkpoint_interval: int = 1  # epochs between checkpoints
    eval_interval: int = 0  # epochs between validation runs; 0 = only after the last epoch
    # The global batch is batch_size x num_workers. With base_batch_size > 0, lr is the rate for that
    # global batch and is scaled linearly to the actual one (Goyal et al.); 0 uses lr as given.
    base_batch_size: int = 0
    # Ray Train (every training command runs in TorchTrainer workers).
    num_workers: int = 1  # training processes (one per GPU with use_gpu)
    resources_per_worker: dict[str, float] = field(default_factory=dict)  # e.g. {CPU: 8, GPU: 1}
    placement_strategy: str = "PACK"  # Ray placement of the workers: PACK, SPREAD, STRICT_PACK, STRICT_SPREAD
    sync_bn: bool = False  # convert BatchNorm to SyncBatchNorm when num_workers > 1 (needs norm_eval false)
    storage_path: str = ""  # Ray storage for reported checkpoints: local dir, NFS or URI; "" = WORK_DIR/ray
    checkpoints_to_keep: int = 2  # reported checkpoints kept by Ray (best by val segm AP when evaluated)
    max_failures: int = 3  # worker failures survived by restarting from the last reported checkpoint
    inject_failure_at_step: int = -1  # testing only: worker rank 1 (or 0 if alone) raises once at this step


@dataclass
class EvalConfig:
    topk: int = 100  # instances kept per image
    mask_threshold: float = 0.5
    score_threshold: float = 0.0
    batch_size: int = 4


@dataclass
class SSLConfig:
    """DenseCL self-supervised pre-training (``sp-ray ssl``), Wang et al. CVPR 2021.

    The ResNet comes from ``model.depth`` and ``model.backbone_weights`` (initialisation); device, AMP,
    seed, logging and checkpoint interval from ``train``; DataLoader workers from ``data.num_workers``.
    """

    epochs: int = 200  # DenseCL's ImageNet schedule
    batch_size: int = 32  # images per training process; the official run is 8 GPUs x 32 = 256
    lr: float = 0.03  # SGD rate for a global batch of base_batch_size (DenseCL / MoCo-v2 use 0.03 at 256)
    base_batch_size: int = 256  # lr is scaled linearly by (global batch / base_batch_size)
    sgd_momentum: float = 0.9  # SGD momentum (the key encoder's EMA factor is `momentum`)
    weight_decay: float = 1e-4  # on every query-encoder parameter, as in the official runs
    temperature: float = 0.2  # InfoNCE temperature of both losses
    loss_lambda: float = 0.5  # loss = (1 - lambda) global + lambda dense
    queue_size: int = 65536  # negatives in each queue (global and dense); a multiple of the global batch
    momentum: float = 0.999  # EMA factor of the key encoder
    proj_dim: int = 128  # output width of the global and dense projection heads
    hidden_dim: int = 2048  # hidden width of both heads
    image_size: int = 224  # side of the square crops fed to the encoders
    crop_scale_min: float = 0.2  # RandomResizedCrop keeps 0.2..1 of the image area (MoCo-v2)
    jitter_prob: float = 0.8  # probability of colour jitter
    brightness: float = 0.4  # colour jitter strengths (torchvision ColorJitter), MoCo-v2's values
    contrast: float = 0.4
    saturation: float = 0.4
    hue: float = 0.1
    grayscale_prob: float = 0.2  # probability of a grayscale view (kept 3-channel)
    blur_prob: float = 0.5  # probability of a Gaussian blur
    # Blur radius range [min, max] in pixels for 224 px crops; scaled with image_size.
    blur_sigma: list[float] = field(default_factory=lambda: [0.1, 2.0])
    flip_prob: float = 0.5  # probability of a horizontal flip of each view


@dataclass
class ProposeConfig:
    """Saliency mask proposals (``sp-ray propose``), SP's step (A) = FreeSOLO's Free Mask (METHODS.md 1.1).

    The frozen ResNet is ``model.depth`` with ``model.backbone_weights``. The defaults are the paper's.
    """

    # "saliency": the Free Mask proposals below. "clip": language-vision prompts (UPLVP) from a CLIP model,
    # settings ``clip.*`` (``sp_ray.pretrain.clip_proposals``); the batching and sharding keys below still apply.
    proposer: str = "saliency"
    scales: list[float] = field(default_factory=lambda: [1.0, 0.5, 0.25])  # C5 resizes = the query pyramid
    mask_threshold: float = 0.5  # on the per-query min-max normalised correlation, at C5 and at image size
    min_area: int = 2  # C5 cells a mask needs to enter NMS (the reference keeps area > 1)
    nms_sigma: float = 2.0  # Gaussian Matrix NMS: a mask's score decays by exp(-sigma * IoU^2)
    top_k: int = 20  # masks kept per image after Matrix NMS, before the filters
    min_center_y: float = 0.2  # keep a mask only if its centre lies below this fraction of H (not sky)
    max_box_width: float = 0.95  # keep a mask only if its box is narrower than this share of W (background)
    min_maskness: float = 0.7  # keep a mask only if its decayed maskness reaches this
    # SP's reference resizes to exactly 1333x800 (keep_ratio False): every input then has one shape, so
    # an actor's batch is one backbone forward with no padding, whose border would yield masks of its own.
    # keep_ratio true is FreeSOLO's short-side 800 / long-side 1333 resize. Either way each side is then
    # rounded to a multiple of 32, so a C5 cell covers exactly 32x32 input pixels and the masks upsample to
    # the image without an offset. Masks are written at the original image size in both cases.
    keep_ratio: bool = False
    max_size: int = 1333  # input width (keep_ratio false) or long-side cap (keep_ratio true)
    short_size: int = 800  # input height (keep_ratio false) or short-side target (keep_ratio true)
    batch_size: int = 8  # images per backbone forward inside an actor
    shard_size: int = 256  # images per shard: one part file under OUT/shards, the unit a rerun skips
    num_actors: int = 0  # Ray Data actors; 0 = one per GPU of the cluster, or 1 on a cluster without GPUs
    cpus_per_actor: float = 1.0  # CPUs reserved per actor (image decoding and, without a GPU, the backbone)


@dataclass
class PretrainConfig:
    """Saliency-prompt pre-training of K-Net (``sp-ray pretrain``), SP's step (B) (METHODS.md 1.2-1.4).

    The pseudo masks are ``data.train_annotations`` (``annotations.json`` of ``sp-ray propose``, one
    class) on ``data.train_images``; their saliency queries S_l are ``prompts``.
    """

    enabled: bool = False  # build the pre-training wrapper (prompts + L_ker); `sp-ray pretrain` sets it
    prompts: str = ""  # prompts.npy of `sp-ray propose` (row id - 1 = annotation id); "" = next to the json
    prompt_rule: str = "cosine"  # "cosine": each kernel takes its nearest prompt; "fixed": prompts tiled
    prompt_source: str = "feature"  # "feature": P5 pooled in the box; "image": box crop through the backbone
    prompt_drop: float = 0.1  # each kernel's prompt is dropped with this probability (mask_ratio)
    num_prompts: int = 20  # an image's prompts are tiled to this many before the fixed rule (reference)
    image_prompt_size: int = 128  # side of the augmented box crops of the image prompt
    kernel_loss_weight: float = 1.0  # weight of L_ker at every stage
    # Collapse guard of the L_ker targets Linear(S_l). "fixed": a random orthogonal Linear that is never
    # trained, so distinct S_l keep distinct targets. "learned": a trainable Linear (the reference's) plus
    # a term that keeps the pairwise angles of the targets those of the queries, weighted by angle_weight.
    kernel_projection: str = "fixed"
    angle_weight: float = 1.0


@dataclass
class SelfTrainConfig:
    """FreeSOLO self-training (``sp-ray propose --from-checkpoint``): a trained model re-labels the images.

    Each kernel is one candidate: score = max class probability x maskness (mean probability inside the
    mask); candidates are ranked, decayed by Matrix NMS and kept when they pass every threshold below.
    FreeSOLO keeps decayed scores >= 0.3, at most 20 per image, narrower than 0.95 of the image.
    Images, shards and actors follow the ``propose`` section.
    """

    score_threshold: float = 0.3  # on the Matrix-NMS-decayed score
    maskness_threshold: float = 0.7  # mean probability inside the mask (the Free Mask filter's value)
    max_per_image: int = 20
    nms_sigma: float = 2.0  # Gaussian Matrix NMS, as the Free Mask proposals
    max_box_width: float = 0.95  # drop masks whose box spans this share of the image width or more
    mask_threshold: float = 0.5  # a pixel is in the pseudo mask where the probability exceeds this


@dataclass
class ClipConfig:
    """Language-vision prompts (UPLVP, ``propose.proposer: clip``): pseudo masks from an open_clip ViT.

    Dense MaskCLIP features of the image are compared with the text embeddings of class-free object
    words (``sp_ray.pretrain.clip_proposals``). Only local files are read: nothing is ever downloaded.
    """

    model: str = "ViT-B-32"  # an open_clip built-in ViT config name, or a local JSON file in that format
    weights: str | None = None  # local open_clip state dict (.pt/.pth/.bin/.safetensors) of that model
    allow_random: bool = False  # weights null is an error unless this is set: random CLIP, for tests only
    # "produce": masks from the word activation maps. "rescore": the saliency proposals (propose.*) are kept
    # where CLIP finds an object word in them, scored by that similarity.
    mode: str = "produce"
    words: list[str] = field(default_factory=lambda: ["object", "thing", "item", "shape", "figure", "entity"])
    # A pixel (produce) or mask (rescore) counts only where some object word beats every background word.
    background_words: list[str] = field(
        default_factory=lambda: ["background", "sky", "wall", "floor", "ground", "road", "grass", "water"]
    )
    templates: list[str] = field(  # prompt ensemble; "{}" is the word
        default_factory=lambda: ["a photo of a {}.", "a photo of the {}.", "a photo of a small {}.",
                                 "a photo of a large {}."]
    )
    image_size: int = 448  # square CLIP input side (a multiple of the patch size): a 14x14 grid for ViT-B/32
    mean: list[float] = field(default_factory=lambda: [0.48145466, 0.4578275, 0.40821073])  # of 0..1 RGB
    std: list[float] = field(default_factory=lambda: [0.26862954, 0.26130258, 0.27577711])
    mask_threshold: float = 0.5  # on the per-word min-max normalised activation, at grid and at image size
    min_area: int = 2  # grid cells a connected component needs to become a candidate
    nms_sigma: float = 2.0  # Gaussian Matrix NMS over the candidates of all words
    top_k: int = 20  # masks kept per image after Matrix NMS, before the filters
    max_box_width: float = 0.95  # keep a mask only if its box is narrower than this share of W
    min_score: float = 0.5  # produce: keep a mask only if its decayed maskness reaches this
    min_similarity: float = 0.2  # rescore: keep a mask only if its best word cosine reaches this


@dataclass
class InstanceUniqueConfig:
    """Instance-unique querying (IUQ, NeurIPS 2022): fine-tuning losses for query-based models.

    Either weight > 0 trains the IUQ objective (``sp_ray.objectives.instance_unique``); 0 leaves training unchanged.
    """

    inter_scene_weight: float = 0.0  # focal loss of the final queries' masks on other images' features
    memory_size: int = 16  # images in the FIFO memory of detached mask features (per training process)
    memory_resolution: int = 16  # the memory's feature maps are average-pooled to this side
    equivariance_mask_weight: float = 0.0  # masks of T(image) vs T(masks of image), same query index
    equivariance_feature_weight: float = 0.0  # FPN features of T(image) vs T(features of image)
    equivariance_transform: str = "flip"  # T: "flip" (horizontal), "rescale" or "flip_rescale"
    rescale_range: list[float] = field(default_factory=lambda: [0.5, 1.0])  # rescale factor, drawn uniformly


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    ssl: SSLConfig = field(default_factory=SSLConfig)
    propose: ProposeConfig = field(default_factory=ProposeConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    selftrain: SelfTrainConfig = field(default_factory=SelfTrainConfig)
    clip: ClipConfig = field(default_factory=ClipConfig)
    iuq: InstanceUniqueConfig = field(default_factory=InstanceUniqueConfig)


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Build a Config from dataclass defaults, a YAML file (with its ``_base_`` parents) and overrides.

    Args:
        path: YAML file, or None for the defaults.
        overrides: ``dotted.key=value`` strings applied last; values are parsed as YAML scalars.

    Returns:
        The resolved Config.

    Raises:
        ConfigError: unknown key, wrong type, bad override syntax or a ``_base_`` cycle, naming the
            file (or the override) and the dotted key.
    """
    if path is None:
        return apply_overrides(Config(), overrides)
    return load_yaml_dataclass(Config, path, overrides)


def load_yaml_dataclass(schema: type[T], path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> T:
    """Build a ``schema`` dataclass from a YAML file (``_base_`` parents allowed) and dotted overrides.

    Every key is checked against ``schema`` as ``load_config`` checks a Config (the sweep files of
    ``sp-ray tune`` use it with their own schema).
    """
    merged = _read_with_bases(Path(path), chain=(), schema=schema)
    for item in overrides:
        _merge(merged, _parse_override(item, schema))
    return _build(schema, merged, prefix="")


def apply_overrides(cfg: Config, overrides: list[str] | tuple[str, ...]) -> Config:
    """Return a copy of ``cfg`` with ``dotted.key=value`` overrides applied (checked like a file's keys)."""
    data = config_to_dict(cfg)
    for item in overrides:
        _merge(data, _parse_override(item, Config))
    return _build(Config, data, prefix="")


def _parse_override(item: str, schema: type) -> dict[str, Any]:
    key, sep, raw = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {item!r}: expected KEY=VALUE, e.g. model.num_kernels=16")
    try:
        nested: Any = _safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        # A tag such as !!python/object is refused by the safe loader; say so in one line.
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(
            f"override {item!r}: the value is not a plain YAML scalar or list ({problem}); "
            "write numbers, strings, true/false, null or [a, b] (quote a string that starts with ! or &)"
        ) from None
    for part in reversed(key.split(".")):
        nested = {part: nested}
    _check_tree(nested, schema, source=f"override {item!r}")
    return nested


def config_to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def config_from_dict(data: dict[str, Any], source: str = "<dict>") -> Config:
    """Rebuild a Config from ``config_to_dict`` output (e.g. a checkpoint's config.yaml), strictly."""
    _check_tree(data, Config, source=source)
    return _build(Config, data, prefix="")


# The settings that name a local file or folder. Ray workers do not run in the driver's directory, so a
# relative path is made absolute on the driver (``absolute_paths``), against the directory the checks used.
PATH_KEYS = (
    "model.backbone_weights", "data.train_annotations", "data.train_images", "data.val_annotations",
    "data.val_images", "train.storage_path", "pretrain.prompts", "clip.weights",
)


def absolute_paths(cfg: Config, base: str | Path | None = None) -> Config:
    """``cfg`` with every relative path of ``PATH_KEYS`` made absolute against ``base`` (default: the current
    directory); empty, None and URI (``s3://...``) values are left as they are."""
    base = Path(base or Path.cwd()).absolute()
    sections: dict[str, dict[str, Any]] = {}
    for dotted in PATH_KEYS:
        section, key = dotted.split(".")
        value = getattr(getattr(cfg, section), key)
        if value and "://" not in value and not Path(value).is_absolute():
            sections.setdefault(section, {})[key] = str(base / value)
    return dataclasses.replace(
        cfg, **{name: dataclasses.replace(getattr(cfg, name), **keys) for name, keys in sections.items()}
    )


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)


def config_hash(cfg: Config) -> str:
    """A short stable hash of the resolved config (recorded in checkpoints and exported models)."""
    blob = json.dumps(config_to_dict(cfg), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _read_with_bases(path: Path, chain: tuple[Path, ...], schema: type) -> dict[str, Any]:
    path = path.resolve()
    if path in chain:
        cycle = " -> ".join(str(p) for p in (*chain, path))
        raise ConfigError(f"{path}: _base_ cycle: {cycle}")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    with open(path) as f:
        try:
            data = _safe_load(f) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML: {err}") from err
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(data).__name__}")
    bases = data.pop("_base_", [])
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise ConfigError(f"{path}: _base_ must be a path or a list of paths")
    _check_tree(data, schema, source=str(path))
    merged: dict[str, Any] = {}
    for base in bases:
        _merge(merged, _read_with_bases(path.parent / base, chain=(*chain, path), schema=schema))
    _merge(merged, data)
    return merged


def _merge(into: dict[str, Any], new: dict[str, Any]) -> None:
    for key, value in new.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = value


def _check_tree(data: Any, schema: type, *, source: str, prefix: str = "") -> None:
    """Check keys and value types of a (partial) config tree against a dataclass schema."""
    if not isinstance(data, dict):
        where = prefix.rstrip(".") or "the top level"
        raise ConfigError(f"{source}: {where} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(schema)
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if key not in hints:
            close = difflib.get_close_matches(str(key), list(hints), n=1)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else ""
            raise ConfigError(
                f"{source}: unknown key '{dotted}'{hint}; valid keys here: {', '.join(sorted(hints))}"
            )
        expected = hints[key]
        if dataclasses.is_dataclass(expected):
            _check_tree(value, expected, source=source, prefix=f"{dotted}.")
        elif not _fits(value, expected):
            raise ConfigError(
                f"{source}: '{dotted}' must be {_type_name(expected)}, got {value!r} ({type(value).__name__})"
            )


def _fits(value: Any, expected: Any) -> bool:
    origin = typing.get_origin(expected)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, arg) for arg in typing.get_args(expected))
    if origin is list:
        (item,) = typing.get_args(expected)
        return isinstance(value, list) and all(_fits(v, item) for v in value)
    if origin is dict:
        key_type, value_type = typing.get_args(expected)
        return isinstance(value, dict) and all(
            _fits(k, key_type) and _fits(v, value_type) for k, v in value.items()
        )
    if expected is type(None):
        return value is None
    if expected is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if expected is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, expected)


def _type_name(expected: Any) -> str:
    origin = typing.get_origin(expected)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(expected))
    if origin is list:
        return f"a list of {_type_name(typing.get_args(expected)[0])}"
    if origin is dict:
        key_type, value_type = typing.get_args(expected)
        return f"a mapping of {_type_name(key_type)} to {_type_name(value_type)}"
    return "null" if expected is type(None) else f"a {expected.__name__}"


def _build(schema: type, data: dict[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(schema)
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        expected = hints[key]
        if dataclasses.is_dataclass(expected):
            kwargs[key] = _build(expected, value, prefix=f"{prefix}{key}.")
        elif expected is float:
            kwargs[key] = float(value)
        elif typing.get_origin(expected) is list and typing.get_args(expected)[0] is float:
            kwargs[key] = [float(v) for v in value]
        elif typing.get_origin(expected) is dict and typing.get_args(expected)[1] is float:
            kwargs[key] = {k: float(v) for k, v in value.items()}
        else:
            kwargs[key] = value
    return schema(**kwargs)


# Value ranges of the keys a training command reads, checked on the driver before any worker starts
# (``check_config_values``). A bound is (lowest, highest, lowest_included); None means unbounded.
_Bound = tuple[float | None, float | None, bool]
_POSITIVE: _Bound = (0, None, False)
_NON_NEGATIVE: _Bound = (0, None, True)
_AT_LEAST_ONE: _Bound = (1, None, True)
_PROBABILITY: _Bound = (0, 1, True)
_COMMON_RANGES: dict[str, _Bound] = {
    "train.num_workers": _AT_LEAST_ONE,
    "train.max_failures": (-1, None, True),  # -1: retry without limit, as Ray's FailureConfig
    "train.checkpoints_to_keep": _AT_LEAST_ONE,
    "train.checkpoint_interval": _NON_NEGATIVE,
    "train.log_interval": _NON_NEGATIVE,
    "data.num_workers": _NON_NEGATIVE,
    "data.max_image_pixels": _AT_LEAST_ONE,
    "model.frozen_stages": (-1, 4, True),
}
_FIT_RANGES: dict[str, _Bound] = {
    "train.epochs": _AT_LEAST_ONE,
    "train.batch_size": _AT_LEAST_ONE,
    "train.lr": _POSITIVE,
    "train.weight_decay": _NON_NEGATIVE,
    "train.backbone_lr_mult": _NON_NEGATIVE,
    "train.norm_decay_mult": _NON_NEGATIVE,
    "train.embed_decay_mult": _NON_NEGATIVE,
    "train.grad_clip": _NON_NEGATIVE,
    "train.lr_gamma": _POSITIVE,
    "train.warmup_iters": _NON_NEGATIVE,
    "train.warmup_ratio": (0, 1, False),
    "train.eval_interval": _NON_NEGATIVE,
    "train.base_batch_size": _NON_NEGATIVE,
    "data.max_size": _AT_LEAST_ONE,
    "data.short_size": _AT_LEAST_ONE,
    "data.size_divisor": _AT_LEAST_ONE,
    "data.flip_prob": _PROBABILITY,
    "eval.topk": _AT_LEAST_ONE,
    "eval.batch_size": _AT_LEAST_ONE,
    "eval.mask_threshold": _PROBABILITY,
    "eval.score_threshold": _PROBABILITY,
    "model.num_classes": _NON_NEGATIVE,
    "model.num_kernels": _AT_LEAST_ONE,
    "model.num_stages": _AT_LEAST_ONE,
    "model.feat_channels": _AT_LEAST_ONE,
    "model.ffn_channels": _AT_LEAST_ONE,
    "model.num_heads": _AT_LEAST_ONE,
}
_SSL_RANGES: dict[str, _Bound] = {
    "ssl.epochs": _AT_LEAST_ONE,
    "ssl.batch_size": _AT_LEAST_ONE,
    "ssl.lr": _POSITIVE,
    "ssl.base_batch_size": _AT_LEAST_ONE,
    "ssl.sgd_momentum": _PROBABILITY,
    "ssl.weight_decay": _NON_NEGATIVE,
    "ssl.temperature": _POSITIVE,
    "ssl.loss_lambda": _PROBABILITY,
    "ssl.queue_size": _AT_LEAST_ONE,
    "ssl.momentum": _PROBABILITY,
    "ssl.proj_dim": _AT_LEAST_ONE,
    "ssl.hidden_dim": _AT_LEAST_ONE,
    "ssl.image_size": _AT_LEAST_ONE,
    "ssl.crop_scale_min": (0, 1, False),
    "ssl.jitter_prob": _PROBABILITY,
    "ssl.grayscale_prob": _PROBABILITY,
    "ssl.blur_prob": _PROBABILITY,
    "ssl.flip_prob": _PROBABILITY,
}
_CHOICES: dict[str, tuple[str, ...]] = {
    "train.placement_strategy": ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"),
    "train.lr_schedule": ("step", "cosine"),
    "loss.mask_loss": ("full", "weak"),
}
_DEPTHS = (18, 34, 50)
TRAINING_TASKS = ("finetune", "pretrain", "ssl")


def _get_dotted(cfg: Config, dotted: str) -> Any:
    section, key = dotted.split(".")
    return getattr(getattr(cfg, section), key)


def _non_finite(value: Any, dotted: str) -> Iterator[tuple[str, Any]]:
    if isinstance(value, float) and not math.isfinite(value):
        yield dotted, value
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _non_finite(item, f"{dotted}[{index}]")
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _non_finite(item, f"{dotted}.{key}")


def _range_text(bound: _Bound) -> str:
    low, high, low_included = bound
    if high is None:
        return f"{'>=' if low_included else '>'} {low:g}"
    return f"in [{low:g}, {high:g}]" if low_included else f"in ({low:g}, {high:g}]"


def check_config_values(cfg: Config, *, task: str) -> None:
    """Check the values a command will use, so that a bad one fails before any Ray worker starts.

    Every float of the config must be finite; the keys of ``task`` must lie in their ranges (sizes and
    epochs positive, probabilities in [0, 1], ...) and the named choices be known.

    Args:
        cfg: the resolved config.
        task: "finetune" or "pretrain" (the ``fit`` loop), or "ssl" (DenseCL).

    Raises:
        ConfigError: the first bad value, naming the dotted key, its value and the allowed range.
    """
    if task not in TRAINING_TASKS:
        raise ValueError(f"task must be one of {TRAINING_TASKS}, got {task!r}")
    for section in dataclasses.fields(cfg):
        for item in dataclasses.fields(getattr(cfg, section.name)):
            dotted = f"{section.name}.{item.name}"
            for where, value in _non_finite(_get_dotted(cfg, dotted), dotted):
                raise ConfigError(f"{where} is {value}: it must be a finite number; set {where}=VALUE")
    ranges = {**_COMMON_RANGES, **(_SSL_RANGES if task == "ssl" else _FIT_RANGES)}
    for dotted, bound in ranges.items():
        value = _get_dotted(cfg, dotted)
        low, high, low_included = bound
        below = low is not None and (value < low if low_included else value <= low)
        if below or (high is not None and value > high):
            raise ConfigError(f"{dotted} is {value!r}: it must be {_range_text(bound)}; set {dotted}=VALUE")
    for dotted, choices in _CHOICES.items():
        if task == "ssl" and not dotted.startswith("train."):
            continue
        value = _get_dotted(cfg, dotted)
        if value not in choices:
            raise ConfigError(f"{dotted} is {value!r}: it must be one of {', '.join(choices)}")
    if cfg.model.depth not in _DEPTHS:
        raise ConfigError(f"model.depth is {cfg.model.depth!r}: ResNet depths are {', '.join(map(str, _DEPTHS))}")
    if task != "ssl":
        scale = cfg.data.train_scale_range
        if len(scale) != 2 or not 0 < scale[0] <= scale[1]:
            raise ConfigError(
                f"data.train_scale_range is {scale!r}: it must be [low, high] with 0 < low <= high, e.g. [0.8, 1.2]"
            )
        if any(epoch < 0 for epoch in cfg.train.lr_steps):
            raise ConfigError(f"train.lr_steps is {cfg.train.lr_steps!r}: epochs must be >= 0")
