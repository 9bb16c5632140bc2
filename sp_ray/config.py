"""Typed configuration: dataclass defaults, YAML files that list differences, dotted overrides.

A YAML file may name one or more parents with ``_base_`` (paths relative to the file); parents are
merged first, the file's own keys win. Every key of every file is checked against the dataclasses
before merging, so an error names the file and the dotted key. Command-line overrides
(``model.num_kernels=16``) are parsed as YAML scalars and checked the same way.

``model.name`` picks the family's ``loss`` section and the family-only keys of ``model``
(``FAMILY_SECTIONS``): a file or override is checked against the keys of every family, and the merged config
against its own family, so that a key of another family is an error naming the key, the file and the family.
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
    """The model section of K-Net and Mask R-CNN, and the keys every family has (Mask R-CNN reads the ResNet
    keys and num_classes); ``Mask2FormerModel`` and ``QueryInstModel`` add their own (``FAMILY_SECTIONS``)."""

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


@dataclass
class Mask2FormerModel(ModelConfig):
    """The model section of Mask2Former: its queries are num_kernels, its decoder layers num_stages (9 in the
    paper) and its decoder FFN width ffn_channels; the keys below are its pixel decoder's."""

    name: str = "mask2former"
    encoder_layers: int = 6  # deformable-attention encoder layers
    encoder_ffn_channels: int = 1024  # their FFN hidden width
    deform_points: int = 4  # sampling points per head and level of the deformable attention


@dataclass
class QueryInstModel(ModelConfig):
    """The model section of QueryInst: its queries are num_kernels and its dynamic stages num_stages (6 in the
    paper)."""

    name: str = "queryinst"
    dynamic_channels: int = 64  # hidden width of its dynamic instance / mask interaction (DynamicConv)


@dataclass
class LossConfig:
    """Base of the per-family loss sections: ``loss`` of a Config is the one ``FAMILY_SECTIONS`` gives for
    ``model.name``, so a key of another family (K-Net's ``init_dice_weight`` in a QueryInst config, QueryInst's
    ``l1_weight`` in a K-Net one) is an error that names it. The defaults of a key are the same in every family."""


@dataclass
class KNetLoss(LossConfig):
    """K-Net's weights (METHODS.md section 5); the matcher costs mirror the loss weights."""

    cls_weight: float = 2.0
    mask_weight: float = 1.0
    dice_weight: float = 4.0
    init_mask_weight: float = 1.0
    init_dice_weight: float = 4.0
    cost_class: float = 2.0
    cost_dice: float = 4.0
    cost_mask: float = 1.0
    # "full": BCE + dice on the whole target mask (K-Net). "weak": FreeSOLO's losses for noisy pseudo masks
    # (sp_ray.objectives.weak_mask_losses), which see a target only through its x/y projections and its box:
    # max-projection dice, average-projection dice and the LAB colour-affinity pairwise term.
    mask_loss: str = "full"
    projection_weight: float = 4.0  # max-projection dice (FreeSOLO: the dice weight x 1.0)
    avg_projection_weight: float = 0.4  # average-projection dice (FreeSOLO: the dice weight x 0.1)
    pairwise_weight: float = 1.0  # colour-affinity pairwise term (BoxInst / FreeSOLO: 1.0)
    pairwise_color_threshold: float = 0.3  # pairs count where exp(-||LAB_i - LAB_j|| / 2) >= this
    pairwise_warmup_iters: int = 1000  # the pairwise weight ramps up linearly over this many criterion calls


@dataclass
class Mask2FormerLoss(LossConfig):
    """Mask2Former's weights and costs (its paper values are 2 / 5 / 5, every layer alike) and point sampling."""

    cls_weight: float = 2.0
    mask_weight: float = 1.0
    dice_weight: float = 4.0
    cost_class: float = 2.0
    cost_dice: float = 4.0
    cost_mask: float = 1.0
    no_object_weight: float = 0.1  # class weight of "no object" in the softmax cross-entropy
    num_points: int = 12544  # points per mask for the matching costs and the mask losses (112 x 112)
    oversample_ratio: float = 3.0  # candidate points per kept point of the importance sampling
    importance_sample_ratio: float = 0.75  # share of the points taken where the prediction is most uncertain


@dataclass
class QueryInstLoss(LossConfig):
    """QueryInst's box terms (Sparse R-CNN: focal 2 = cls_weight, L1 5, GIoU 2; the same values as matching
    costs, cost_class for the class); its RoI masks take mask_weight (BCE) and dice_weight (paper: dice 8)."""

    cls_weight: float = 2.0
    mask_weight: float = 1.0
    dice_weight: float = 4.0
    cost_class: float = 2.0
    l1_weight: float = 5.0  # L1 of boxes normalised by the image size
    giou_weight: float = 2.0
    cost_l1: float = 5.0
    cost_giou: float = 2.0


@dataclass
class MaskRCNNLoss(LossConfig):
    """torchvision's heads compute the losses of Mask R-CNN as they are."""


@dataclass(frozen=True)
class FamilySections:
    """The sections of a config whose keys depend on ``model.name``, and the family's name in messages."""

    title: str
    model: type[ModelConfig]
    loss: type[LossConfig]


# model.name -> its sections. The family table itself is sp_ray.models.FAMILIES (a test keeps the two key
# sets equal); this one sits here because the config layer cannot import models.
FAMILY_SECTIONS: dict[str, FamilySections] = {
    "knet": FamilySections("K-Net", ModelConfig, KNetLoss),
    "mask2former": FamilySections("Mask2Former", Mask2FormerModel, Mask2FormerLoss),
    "queryinst": FamilySections("QueryInst", QueryInstModel, QueryInstLoss),
    "maskrcnn": FamilySections("Mask R-CNN", ModelConfig, MaskRCNNLoss),
}
FAMILY_SECTION_NAMES = ("model", "loss")


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
    # mmdet's Rotate(level) when training: +-level/10 x 30 degrees about the centre, with rotate_prob; 0 = off.
    # The reference's K-Net COCO fine-tuning uses level 3 (9 degrees).
    rotate_level: float = 0.0
    rotate_prob: float = 0.5  # mmdet Rotate's default prob
    size_divisor: int = 32
    # Batches of one orientation (width >= height, or width < height, from the json), as detectron2 and mmdet
    # batch: less padding. Each image once per epoch; a group's last batch may be smaller
    # (sp_ray.data.grouped_batching). false: a shuffle of all images and full batches only.
    group_by_aspect_ratio: bool = True
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
    # Experiment tracking, from rank 0 (README "Experiment tracking"; sp_ray.train.tracking).
    tensorboard: bool = True  # TensorBoard event files under WORK_DIR/tensorboard
    mlflow_tracking_uri: str = ""  # an MLflow run here (file:DIR, sqlite:///FILE.db, http://HOST:5000); "" = none
    mlflow_experiment: str = ""  # its experiment; "" = "sp-ray"
    wandb_project: str = ""  # a W&B run in this project (needs the wandb package); "" = none
    # Exponential moving average of the weights (detectron2's model_ema, mmdet's EMA hook): after every step
    # ema = decay x ema + (1 - decay) x weights; 0 = off. When on, validation and WORK_DIR/final (what evaluate
    # and export read) use the EMA weights; WORK_DIR/last keeps both. Typical: 0.9998 (0.999 for short runs).
    ema_decay: float = 0.0
    # DDP's find_unused_parameters: needed when a step leaves some trained parameter without a gradient (a
    # branch the forward pass does not take); costs a graph traversal per step. Ray's prepare_model passes it.
    find_unused_parameters: bool = False
    # How rank 0's checkpoint reaches train.storage_path: "sync" (training waits for the copy) or "async" (a
    # background thread copies a snapshot while the next epoch trains; for remote storage such as s3://).
    checkpoint_upload: str = "sync"


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

    Dense MaskCLIP features of the image are compared with the text embeddings of a vocabulary
    (``sp_ray.pretrain.clip_proposals``): class-free object words (``vocabulary: objects``, one category
    "object") or the class names of the target dataset (``vocabulary: classes``, UPLVP's COCO-80 usage:
    every pseudo mask carries the class it is closest to, for class-aware pre-training). Only local files
    are read: nothing is ever downloaded.
    """

    model: str = "ViT-B-32"  # an open_clip built-in ViT config name, or a local JSON file in that format
    weights: str | None = None  # local open_clip state dict (.pt/.pth/.bin/.safetensors) of that model
    allow_random: bool = False  # weights null is an error unless this is set: random CLIP, for tests only
    # "produce": masks from the word activation maps. "rescore": the saliency proposals (propose.*) are kept
    # where CLIP finds an object word in them, scored by that similarity.
    mode: str = "produce"
    # "objects": the text prompts are clip.words and every mask is category 1 "object" (class-free, SP's
    # objectness). "classes": they are the target dataset's class names (clip.categories or clip.class_names)
    # and each mask gets the class whose text embedding its pooled CLIP feature is closest to (UPLVP).
    vocabulary: str = "objects"
    words: list[str] = field(default_factory=lambda: ["object", "thing", "item", "shape", "figure", "entity"])
    # vocabulary classes: a COCO json of the target dataset (e.g. instances_val2017.json) whose "categories"
    # (ids and names) become the vocabulary and the categories of annotations.json ...
    categories: str | None = None
    class_names: list[str] = field(default_factory=list)  # ... or the names themselves, category ids 1..C in order
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
    # how a memory image's pixels are weighted: "instance" (each of its instances and its background weigh
    # equally) or "pixel" (every pixel weighs equally: background dominates)
    inter_scene_balance: str = "instance"
    equivariance_mask_weight: float = 0.0  # the mask term on T(image), see equivariance_target
    # "ground_truth": masks of T(image) vs T(GT masks) under the original view's matching (IUQ's L_equi);
    # "consistency": masks of T(image) vs T(masks of image), query n to query n, both with gradients
    equivariance_target: str = "ground_truth"
    equivariance_feature_weight: float = 0.0  # FPN features of T(image) vs T(features of image)
    equivariance_transform: str = "flip"  # T: "flip" (horizontal), "rescale" or "flip_rescale"
    rescale_range: list[float] = field(default_factory=lambda: [0.5, 1.0])  # rescale factor, drawn uniformly


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    # The loss section of model.name's family (FAMILY_SECTIONS); None picks that family's defaults.
    loss: LossConfig | None = None
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    ssl: SSLConfig = field(default_factory=SSLConfig)
    propose: ProposeConfig = field(default_factory=ProposeConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    selftrain: SelfTrainConfig = field(default_factory=SelfTrainConfig)
    clip: ClipConfig = field(default_factory=ClipConfig)
    iuq: InstanceUniqueConfig = field(default_factory=InstanceUniqueConfig)

    def __post_init__(self) -> None:
        family = _family(self.model.name, source="Config")
        if type(self.model) is ModelConfig and family.model is not ModelConfig:  # the family's keys at their defaults
            self.model = family.model(**dataclasses.asdict(self.model))
        if self.loss is None:
            self.loss = family.loss()
        for section in FAMILY_SECTION_NAMES:
            value, schema = getattr(self, section), getattr(family, section)
            if type(value) is not schema:
                raise ConfigError(
                    f"Config: {section} is a {type(value).__name__}, but model.name {self.model.name!r} "
                    f"({family.title}) takes a {schema.__name__}"
                )


def _family(name: Any, *, source: str) -> FamilySections:
    """The sections of model.name ``name``; an unknown name is a ConfigError."""
    if isinstance(name, str) and name in FAMILY_SECTIONS:
        return FAMILY_SECTIONS[name]
    close = difflib.get_close_matches(str(name), list(FAMILY_SECTIONS), n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    raise ConfigError(
        f"{source}: model.name {name!r} is not a model family{hint}; families: {', '.join(sorted(FAMILY_SECTIONS))}"
    )


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
        merged: dict[str, Any] = {}
        origins: dict[str, str] = {}
        for item in overrides:
            _merge(merged, _parse_override(item, Config), origins, source=f"override {item!r}")
        return _build_config(merged, origins, source="the defaults")
    return load_yaml_dataclass(Config, path, overrides)


def load_yaml_dataclass(schema: type[T], path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> T:
    """Build a ``schema`` dataclass from a YAML file (``_base_`` parents allowed) and dotted overrides.

    Every key is checked against ``schema`` as ``load_config`` checks a Config (the sweep files of
    ``sp-ray tune`` use it with their own schema).
    """
    origins: dict[str, str] = {}
    merged = _read_with_bases(Path(path), chain=(), schema=schema, origins=origins)
    for item in overrides:
        _merge(merged, _parse_override(item, schema), origins, source=f"override {item!r}")
    if schema is Config:
        return _build_config(merged, origins, source=str(Path(path).resolve()))  # type: ignore[return-value]
    return _build(schema, merged, prefix="")


def apply_overrides(cfg: Config, overrides: list[str] | tuple[str, ...]) -> Config:
    """Return a copy of ``cfg`` with ``dotted.key=value`` overrides applied (checked like a file's keys).

    An override of ``model.name`` that changes the family keeps the model and loss values of ``cfg`` that the
    new family has too and drops the others (they were ``cfg``'s, not the overrides'); a model or loss key in
    the overrides must apply to the resulting family.
    """
    data = config_to_dict(cfg)
    origins: dict[str, str] = {}
    for item in overrides:
        _merge(data, _parse_override(item, Config), origins, source=f"override {item!r}")
    name = data["model"]["name"]
    if name != cfg.model.name and name in FAMILY_SECTIONS:
        for section in FAMILY_SECTION_NAMES:
            keys = _field_names(getattr(FAMILY_SECTIONS[name], section))
            data[section] = {k: v for k, v in data[section].items() if k in keys or f"{section}.{k}" in origins}
    return _build_config(data, origins, source="the config")


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
    """Rebuild a Config from ``config_to_dict`` output (e.g. a run's ``train_loop_config``), strictly."""
    _check_tree(data, Config, source=source)
    return _build_config(data, {}, source=source)


def check_config_tree(data: dict[str, Any], source: str) -> None:
    """Check a partial config tree (keys and value types) whose family may be any: a ``model`` or ``loss`` key
    must be a key of some family (``config_from_dict`` then checks it against the family of the whole config).

    Raises:
        ConfigError: an unknown key (with a close name) or a value of the wrong type, naming ``source``.
    """
    _check_tree(data, Config, source=source)
    for section in FAMILY_SECTION_NAMES:
        keys = data.get(section)
        known = _section_hints(section, None)
        for key in keys if isinstance(keys, dict) else ():
            if key not in known:
                close = difflib.get_close_matches(str(key), list(known), n=1)
                hint = f" (did you mean '{section}.{close[0]}'?)" if close else ""
                families = "; ".join(f"{f.title}: {', '.join(_field_names(getattr(f, section))) or 'none'}"
                                     for f in FAMILY_SECTIONS.values())
                raise ConfigError(
                    f"{source}: unknown key '{section}.{key}'{hint}; {section} keys of the families: {families}"
                )


def field_annotation(dotted: str) -> Any:
    """The annotation of a dotted Config key (a model or loss key in whichever family has it); KeyError if none."""
    section, _, key = dotted.partition(".")
    hints = _section_hints(section, None) if section in FAMILY_SECTION_NAMES else _hints(_hints(Config)[section])
    return hints[key]


# The keys of the model and loss sections of every family before those sections were split per family
# (one ModelConfig, one LossConfig): a checkpoint's config.yaml written then carries all of them.
KEYS_BEFORE_SPLIT = {
    "model": ("encoder_layers", "encoder_ffn_channels", "deform_points", "dynamic_channels"),
    "loss": (
        "cls_weight", "mask_weight", "dice_weight", "init_mask_weight", "init_dice_weight", "cost_class",
        "cost_dice", "cost_mask", "mask_loss", "projection_weight", "avg_projection_weight", "pairwise_weight",
        "pairwise_color_threshold", "pairwise_warmup_iters", "no_object_weight", "num_points", "oversample_ratio",
        "importance_sample_ratio", "l1_weight", "giou_weight", "cost_l1", "cost_giou",
    ),
}


def checkpoint_config_from_dict(data: dict[str, Any], source: str = "<checkpoint>") -> Config:
    """``config_from_dict`` for the config.yaml of a checkpoint, which may predate the per-family sections.

    The one rule for old checkpoints: a key of ``model`` or ``loss`` that the checkpoint's family (its
    ``model.name``) does not have is dropped when it is one of ``KEYS_BEFORE_SPLIT`` (that family never read
    it); every other key is checked as ``config_from_dict`` checks it. Only checkpoint loading uses this.
    """
    model = data.get("model")
    name = model.get("name", ModelConfig.name) if isinstance(model, dict) else ModelConfig.name
    if name in FAMILY_SECTIONS:
        data = dict(data)
        for section in FAMILY_SECTION_NAMES:
            if isinstance(data.get(section), dict):
                keys = _field_names(getattr(FAMILY_SECTIONS[name], section))
                data[section] = {k: v for k, v in data[section].items()
                                 if k in keys or k not in KEYS_BEFORE_SPLIT[section]}
    return config_from_dict(data, source=source)


# The settings that name a local file or folder. Ray workers do not run in the driver's directory, so a
# relative path is made absolute on the driver (``absolute_paths``), against the directory the checks used.
PATH_KEYS = (
    "model.backbone_weights", "data.train_annotations", "data.train_images", "data.val_annotations",
    "data.val_images", "train.storage_path", "pretrain.prompts", "clip.weights",
)


def absolute_paths(cfg: Config, base: str | Path | None = None) -> Config:
    """``cfg`` with every relative path of ``PATH_KEYS`` made absolute against ``base`` (default: the current
    directory); empty, None and URI (``s3://...``) values are left as they are. A relative local MLflow store
    (``train.mlflow_tracking_uri`` ``file:DIR`` or ``DIR``) becomes ``file:/ABSOLUTE/DIR``."""
    base = Path(base or Path.cwd()).absolute()
    sections: dict[str, dict[str, Any]] = {}
    for dotted in PATH_KEYS:
        section, key = dotted.split(".")
        value = getattr(getattr(cfg, section), key)
        if value and "://" not in value and not Path(value).is_absolute():
            sections.setdefault(section, {})[key] = str(base / value)
    uri = absolute_tracking_uri(cfg.train.mlflow_tracking_uri, base)
    if uri != cfg.train.mlflow_tracking_uri:
        sections.setdefault("train", {})["mlflow_tracking_uri"] = uri
    return dataclasses.replace(
        cfg, **{name: dataclasses.replace(getattr(cfg, name), **keys) for name, keys in sections.items()}
    )


def absolute_tracking_uri(uri: str, base: str | Path | None = None) -> str:
    """An MLflow tracking URI with a relative local store (``file:DIR``, a bare ``DIR``, ``sqlite:///FILE``)
    made absolute against ``base`` (default: the current directory), as Ray workers and Tune trials run in
    other directories; any other URI (``http://``, ``databricks``, absolute paths, "") as it is."""
    base = Path(base or Path.cwd()).absolute()
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return f"sqlite:///{base / uri[len('sqlite:///'):]}"
    if uri != "databricks" and (uri.startswith("file:") or ":" not in uri):
        local = uri.removeprefix("file:")
        if local and not local.startswith("/"):
            return f"file:{base / local}"
    return uri


def dump_config(cfg: Config) -> str:
    """The resolved config as YAML; its model and loss sections hold the keys of its family only."""
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)


def config_hash(cfg: Config) -> str:
    """A short stable hash of the resolved config (recorded in checkpoints and exported models)."""
    blob = json.dumps(config_to_dict(cfg), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _read_with_bases(
    path: Path, chain: tuple[Path, ...], schema: type, origins: dict[str, str] | None = None
) -> dict[str, Any]:
    """The merged keys of ``path`` and its ``_base_`` parents; ``origins`` gets the file of each dotted key."""
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
    bases = _read_bases(path, data)
    _check_tree(data, schema, source=str(path))
    merged: dict[str, Any] = {}
    origins = {} if origins is None else origins
    for base in bases:
        _merge(merged, _read_with_bases(path.parent / base, chain=(*chain, path), schema=schema, origins=origins))
    _merge(merged, data, origins, source=str(path))
    return merged


def _read_bases(path: Path, data: dict[str, Any]) -> list[str]:
    """Pop the ``_base_`` entry of the YAML mapping ``data`` of ``path``: its parents, as written."""
    bases = data.pop("_base_", [])
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise ConfigError(f"{path}: _base_ must be a path or a list of paths")
    return bases


def _merge(
    into: dict[str, Any], new: dict[str, Any], origins: dict[str, str] | None = None, *, source: str = "",
    prefix: str = "",
) -> None:
    for key, value in new.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value, origins, source=source, prefix=f"{dotted}.")
        else:
            into[key] = value
            if origins is not None:
                for leaf in _leaves(value, dotted):
                    origins[leaf] = source


def _leaves(value: Any, dotted: str) -> Iterator[str]:
    if isinstance(value, dict) and value:
        for key, item in value.items():
            yield from _leaves(item, f"{dotted}.{key}")
    else:
        yield dotted


def _field_names(schema: type) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(schema))


def _hints(schema: type) -> dict[str, Any]:
    """The annotations of the fields of ``schema`` (ClassVars excluded)."""
    hints = typing.get_type_hints(schema)
    return {name: hints[name] for name in _field_names(schema)}


def _section_hints(section: str, family: str | None) -> dict[str, Any]:
    """The keys of ``section`` (model or loss) of ``family``, or (None: a tree whose model.name is not known yet)
    of any family."""
    if family is not None:
        return _hints(getattr(FAMILY_SECTIONS[family], section))
    merged: dict[str, Any] = {}
    for sections in FAMILY_SECTIONS.values():
        merged.update(_hints(getattr(sections, section)))
    return merged


def _check_tree(data: Any, schema: type, *, source: str, prefix: str = "", hints: dict[str, Any] | None = None,
                defer_unknown: bool = False) -> None:
    """Check keys and value types of a (partial) config tree against a dataclass schema.

    The ``model`` and ``loss`` sections of a Config are checked against the keys of every family, as the
    tree's family may not be known yet (a file with a ``_base_``, an override); a key that no family has is
    left to ``_check_family``, which checks the merged tree against its own family and names the key.
    """
    if not isinstance(data, dict):
        where = prefix.rstrip(".") or "the top level"
        raise ConfigError(f"{source}: {where} must be a mapping, got {data!r}")
    hints = _hints(schema) if hints is None else hints
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if key not in hints and defer_unknown:
            continue
        if key not in hints:
            close = difflib.get_close_matches(str(key), list(hints), n=1)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else ""
            raise ConfigError(
                f"{source}: unknown key '{dotted}'{hint}; valid keys here: {', '.join(sorted(hints))}"
            )
        expected = hints[key]
        if schema is Config and key in FAMILY_SECTION_NAMES:
            _check_tree(value, object, source=source, prefix=f"{dotted}.", hints=_section_hints(key, None),
                        defer_unknown=True)
        elif dataclasses.is_dataclass(expected):
            _check_tree(value, expected, source=source, prefix=f"{dotted}.")
        elif not _fits(value, expected):
            raise ConfigError(
                f"{source}: '{dotted}' must be {_type_name(expected)}, got {value!r} ({type(value).__name__})"
            )


def _check_family(data: dict[str, Any], origins: dict[str, str], source: str) -> FamilySections:
    """Check the ``model`` and ``loss`` keys of a whole (merged) config tree against its model.name's sections.

    Raises:
        ConfigError: an unknown model.name, or a model or loss key its family does not have, naming the key,
            the file or override that set it, the family, the keys of that family's section and a close name
            if there is one.
    """
    name = (data.get("model") or {}).get("name", ModelConfig.name)
    family = _family(name, source=origins.get("model.name", source))
    for section in FAMILY_SECTION_NAMES:
        schema = getattr(family, section)
        keys = _field_names(schema)
        for key in data.get(section) or {}:
            if key in keys:
                continue
            where = origins.get(f"{section}.{key}", source)
            what = f"model.name {name!r} ({family.title})"
            applies = (f"{what} has the {section} keys: {', '.join(keys)}" if keys else
                       f"{what} has no {section} keys ({schema.__doc__.strip().rstrip('.')}): remove the {section} "
                       "section")
            others = [f.title for f in FAMILY_SECTIONS.values() if key in _field_names(getattr(f, section))]
            if others:
                raise ConfigError(f"{where}: '{section}.{key}' is a {section} key of {', '.join(others)}, not of "
                                  f"{family.title}; {applies}")
            close = difflib.get_close_matches(str(key), list(keys), n=1)
            hint = f" (did you mean '{section}.{close[0]}'?)" if close else ""
            raise ConfigError(f"{where}: unknown key '{section}.{key}'{hint}; {applies}")
    return family


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


def _build_config(data: dict[str, Any], origins: dict[str, str], *, source: str) -> Config:
    """A Config from a merged, checked tree: its ``model`` and ``loss`` sections are those of its model.name."""
    family = _check_family(data, origins, source)
    tree = dict(data)
    sections = {name: _build(getattr(family, name), tree.pop(name, None) or {}, prefix=f"{name}.")
                for name in FAMILY_SECTION_NAMES}
    return _build(Config, tree, prefix="", extra=sections)


def _build(schema: type, data: dict[str, Any], prefix: str, extra: dict[str, Any] | None = None) -> Any:
    hints = _hints(schema)
    kwargs: dict[str, Any] = dict(extra or {})
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
    "train.ema_decay": (0, 1, True),
    "data.max_size": _AT_LEAST_ONE,
    "data.short_size": _AT_LEAST_ONE,
    "data.size_divisor": _AT_LEAST_ONE,
    "data.flip_prob": _PROBABILITY,
    "data.rotate_level": (0, 10, True),
    "data.rotate_prob": _PROBABILITY,
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
    "train.checkpoint_upload": ("sync", "async"),
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
        section, key = dotted.split(".")
        if key not in _field_names(type(getattr(cfg, section))):
            continue  # a loss key of another family (loss.mask_loss is K-Net's)
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
        if cfg.train.ema_decay >= 1:
            raise ConfigError(
                f"train.ema_decay is {cfg.train.ema_decay!r}: it must be in [0, 1) (0 = no EMA; 1 would never "
                "update the average), e.g. train.ema_decay=0.9998"
            )
