"""Language-vision prompts (UPLVP, Li et al. 2024): pseudo masks from a CLIP model and a text vocabulary.

UPLVP replaces SP's saliency masks with masks that a language-vision model draws from text. The paper's
proposal script is not public (METHODS.md 2), so this module builds them from an open_clip ViT the way
MaskCLIP (Zhou et al., ECCV 2022) reads dense features out of CLIP.

The vocabulary (``clip.vocabulary``) is one of:

- ``objects`` (the default): class-free object words (``clip.words``); every mask is category 1 "object",
  as SP's saliency masks are, for class-agnostic pre-training (one class).
- ``classes``: the class names of the target dataset (``clip.categories``, a COCO json, or
  ``clip.class_names``), which is what UPLVP does with COCO's 80 names: its pseudo masks are category-aware.
  Each mask gets the category whose text embedding is closest to its pooled CLIP feature (step 4), and
  annotations.json holds the dataset's categories with their ids, so K-Net pre-trains with num_classes = C
  and its class head fits fine-tuning on that dataset.

The steps:

1. Dense features. The last attention layer's query-key mixing is dropped: each patch token goes through
   that layer's value and output projections, the residual and the MLP, then ``ln_post`` and the visual
   projection, so every patch keeps its own place and lands in the joint image-text space. X: [D, h, w].
2. Word embeddings. Each vocabulary word (and background word) is written into every template, encoded by the
   text tower, L2-normalised and averaged over templates (CLIP's prompt ensemble). T: [V, D].
3. ``produce``: the activation map of word v is A_v = cos(X, T_v), min-max normalised over the image as
   FreeSOLO's Free Mask normalises its correlation maps; a cell is foreground where the normalised map
   reaches ``mask_threshold`` and the word beats every background word there. Each 8-connected component
   of a word's foreground is a candidate, scored by its maskness (the mean normalised activation inside);
   Matrix NMS removes the copies that several words give for one object; the top-k soft maps are
   upsampled to the image and only then binarised; masks as wide as the image and low decayed scores go.
   ``rescore``: CLIP judges the saliency proposals instead: the normalised dense features are averaged
   inside each mask, and the mask is kept, scored by the best word cosine, if that reaches
   ``min_similarity`` and beats every background word.
4. Class of a mask (vocabulary ``classes``): c_l = argmax_v cos(e_l, T_v) over the class names, e_l the mask's
   prompt below; the background words take no part.

The prompt of a mask (a row of ``prompts.npy``) is the L2-normalised mean of the normalised dense features
inside it, a D-dim vector of the joint space. It is not the word embedding: with a handful of class-free
words that would give most masks the same prompt, so L_ker would pull every matched kernel to one target.

Only local files are read. The model is built from an open_clip config (a built-in name or a local JSON)
with the library's model classes and its bundled BPE vocabulary, never through ``create_model`` or
``get_tokenizer``, which can fetch weights, configs or tokenizers from the network; configs that need a
Hugging Face tokenizer, text tower or timm tower are refused, and the Hugging Face hub is put in offline
mode while the model is built.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import hashlib
import json
import os
import pickle
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from torch import Tensor, nn

from sp_ray.config import ClipConfig, ConfigError, ProposeConfig
from sp_ray.pretrain.proposers import OBJECT_CATEGORY, Proposals, Ready, c5_channels
from sp_ray.pretrain.saliency import input_size, nms_top_k_masks

MODES = ("produce", "rescore")
VOCABULARIES = ("objects", "classes")
# The keys of an open_clip config that make the library reach for the Hugging Face hub or timm.
_HUB_KEYS = {"vision_cfg": ("timm_model_name",), "text_cfg": ("hf_model_name", "hf_tokenizer_name")}
_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


class ClipDenseEncoder(nn.Module):
    """MaskCLIP dense features of an open_clip VisionTransformer, as a one-level "backbone".

    The patch grid's positional embedding is resized (bicubic) to the input's grid, so any input whose
    sides are multiples of the patch size works. Every block but the last runs as in CLIP; the last one
    replaces its attention output by the value path out_proj(v_proj(ln_1(x))) (MaskCLIP), keeps the residual
    and the MLP; ``ln_post`` and ``proj`` then map every patch token into the joint space.

    Args:
        visual: ``model.visual`` of an open_clip CLIP: a VisionTransformer without attentional pooling whose
            blocks are the standard ``ResidualAttentionBlock`` (nn.MultiheadAttention).

    Attributes:
        out_channels: [D], D the joint embedding width (``propose`` reads the prompt width from it).
        patch_size: side of a patch in input pixels.
    """

    def __init__(self, visual: nn.Module) -> None:
        super().__init__()
        from open_clip.transformer import ResidualAttentionBlock, VisionTransformer

        if not isinstance(visual, VisionTransformer) or visual.attn_pool is not None or visual.proj is None:
            raise ConfigError(
                "clip.model must be a CLIP ViT (open_clip VisionTransformer with a projection and no attentional "
                f"pooling), got {type(visual).__name__}; ResNet, timm and CoCa towers are not supported"
            )
        if not all(type(block) is ResidualAttentionBlock for block in visual.transformer.resblocks):
            raise ConfigError(
                "clip.model: the dense features need standard ResidualAttentionBlock layers; this config uses custom "
                "attention blocks (qk_norm / scaled attention), which are not supported"
            )
        self.visual = visual
        self.patch_size = int(visual.patch_size[0])
        self.out_channels = [int(visual.proj.shape[1])]

    def forward(self, images: Tensor) -> list[Tensor]:
        """Dense joint-space features.

        Args:
            images: float [B, 3, H, W], normalised with the CLIP mean/std; H and W multiples of the patch size.

        Returns:
            [float [B, D, H/p, W/p]], one level, not normalised.
        """
        visual = self.visual
        batch, _, height, width = images.shape
        if height % self.patch_size or width % self.patch_size:
            raise ValueError(f"CLIP input {height}x{width} is not a multiple of the patch size {self.patch_size}")
        grid = (height // self.patch_size, width // self.patch_size)
        x = visual.conv1(images.to(visual.conv1.weight.dtype))  # (B, C, h, w), C the ViT width
        x = x.flatten(2).transpose(1, 2)  # (B, h*w, C)
        cls_pos, patch_pos = visual.positional_embedding[:1], visual.positional_embedding[1:]
        if tuple(visual.grid_size) != grid:
            patch_pos = patch_pos.reshape(1, *visual.grid_size, -1).permute(0, 3, 1, 2)
            patch_pos = F.interpolate(patch_pos, size=grid, mode="bicubic", align_corners=False)
            patch_pos = patch_pos.flatten(2)[0].T  # (h*w, C)
        cls = (visual.class_embedding + cls_pos).expand(batch, 1, -1)
        x = visual.ln_pre(torch.cat([cls, x + patch_pos], dim=1))  # (B, 1 + h*w, C)

        transformer = visual.transformer
        if not transformer.batch_first:
            x = x.transpose(0, 1)  # (1 + h*w, B, C)
        for block in transformer.resblocks[:-1]:
            x = block(x)
        last = transformer.resblocks[-1]
        channels, bias = x.shape[-1], last.attn.in_proj_bias
        value = F.linear(
            last.ln_1(x), last.attn.in_proj_weight[2 * channels :], None if bias is None else bias[2 * channels :]
        )
        x = x + last.ls_1(last.attn.out_proj(value))
        x = x + last.ls_2(last.mlp(last.ln_2(x)))
        if not transformer.batch_first:
            x = x.transpose(0, 1)
        tokens = visual.ln_post(x[:, 1:]) @ visual.proj  # (B, h*w, D)
        return [tokens.transpose(1, 2).reshape(batch, -1, *grid)]


def check_clip_config(cfg: ClipConfig) -> None:
    """Raise ConfigError naming the ``clip.*`` key of an unusable setting (the weights file is checked on load)."""
    problems = []
    if cfg.mode not in MODES:
        problems.append(f"clip.mode must be one of {MODES}, got {cfg.mode!r}")
    if cfg.vocabulary not in VOCABULARIES:
        problems.append(f"clip.vocabulary must be one of {VOCABULARIES}, got {cfg.vocabulary!r}")
    elif cfg.vocabulary == "classes" and (cfg.categories is None) == (not cfg.class_names):
        problems.append(
            "clip.vocabulary=classes takes the target dataset's class names from exactly one of clip.categories "
            "(a COCO json, e.g. data/coco/annotations/instances_val2017.json) or clip.class_names; "
            f"got categories={cfg.categories!r} and class_names={cfg.class_names}"
        )
    elif cfg.vocabulary == "objects" and (cfg.categories is not None or cfg.class_names):
        problems.append(
            "clip.categories / clip.class_names are used only with clip.vocabulary=classes; set it, or clear them "
            "for the class-free object words"
        )
    if cfg.class_names:
        problems.extend(_name_problems(cfg.class_names, "clip.class_names"))
    if not cfg.words or not all(isinstance(word, str) and word.strip() for word in cfg.words):
        problems.append(f"clip.words must be a non-empty list of words, got {cfg.words}")
    if not all(isinstance(word, str) and word.strip() for word in cfg.background_words):
        problems.append(f"clip.background_words must be words (or an empty list), got {cfg.background_words}")
    if not cfg.templates or not all(isinstance(t, str) and t.count("{}") == 1 for t in cfg.templates):
        problems.append(f'clip.templates must be a non-empty list of strings with one "{{}}" each, got {cfg.templates}')
    if cfg.weights is None and not cfg.allow_random:
        problems.append(
            "clip.weights is null: set it to a local open_clip weights file of clip.model (nothing is downloaded), "
            "or set clip.allow_random=true for a random-init model (tests only)"
        )
    if len(cfg.mean) != 3:
        problems.append(f"clip.mean must be 3 values (of 0..1 RGB), got {cfg.mean}")
    if len(cfg.std) != 3 or min(cfg.std) <= 0:
        problems.append(f"clip.std must be 3 values > 0 (of 0..1 RGB), got {cfg.std}")
    if not 0 < cfg.mask_threshold < 1:
        problems.append(f"clip.mask_threshold must be in (0, 1), got {cfg.mask_threshold}")
    for key in ("image_size", "min_area", "top_k"):
        if getattr(cfg, key) < 1:
            problems.append(f"clip.{key} must be >= 1, got {getattr(cfg, key)}")
    if cfg.nms_sigma <= 0:
        problems.append(f"clip.nms_sigma must be > 0, got {cfg.nms_sigma}")
    if not 0 < cfg.max_box_width <= 1:
        problems.append(f"clip.max_box_width must be in (0, 1], got {cfg.max_box_width}")
    if not -1 <= cfg.min_similarity <= 1:
        problems.append(f"clip.min_similarity is a cosine, so in [-1, 1], got {cfg.min_similarity}")
    if problems:
        raise ConfigError("; ".join(problems))


def _name_problems(names: Sequence[Any], where: str) -> list[str]:
    if not all(isinstance(name, str) and name.strip() for name in names):
        return [f"{where} must be non-empty strings, got {list(names)}"]
    repeated = sorted({name for name in names if list(names).count(name) > 1})
    return [f"{where} names {repeated} more than once; each class needs its own name"] if repeated else []


def vocabulary_categories(cfg: ClipConfig) -> list[dict[str, Any]]:
    """The COCO categories of the pseudo masks: ``[{"id": 1, "name": "object"}]`` for the object words, the
    target dataset's categories for ``clip.vocabulary: classes``.

    Args:
        cfg: the ``clip`` section (checked by `check_clip_config`).

    Returns:
        [{"id", "name"}], ascending by id (the order in which a dataset numbers its labels): the
        ``categories`` of ``clip.categories``'s json, or ids 1..C for ``clip.class_names`` in their order.

    Raises:
        FileNotFoundError: ``clip.categories`` does not exist.
        ConfigError: it is not a json with a non-empty ``categories`` list of unique integer ids and names.
    """
    if cfg.vocabulary != "classes":
        return [dict(OBJECT_CATEGORY)]
    if cfg.class_names:
        return [{"id": index, "name": name} for index, name in enumerate(cfg.class_names, start=1)]
    path = Path(str(cfg.categories))
    if not path.is_file():
        raise FileNotFoundError(
            f"clip.categories={cfg.categories}: no such file; give the COCO json of the target dataset (its "
            "'categories' are the class vocabulary)"
        )
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"clip.categories={cfg.categories} is not valid JSON ({err})") from err
    categories = data.get("categories") if isinstance(data, dict) else None
    if not isinstance(categories, list) or not categories or not all(
        isinstance(c, dict) and isinstance(c.get("id"), int) and not isinstance(c.get("id"), bool) for c in categories
    ):
        raise ConfigError(
            f"clip.categories={cfg.categories} needs a non-empty 'categories' list of {{'id': int, 'name': str}} "
            "entries (a COCO instances json)"
        )
    problems = _name_problems([c.get("name") for c in categories], f"the categories of {cfg.categories}")
    ids = [c["id"] for c in categories]
    if len(set(ids)) != len(ids):
        problems.append(f"the categories of {cfg.categories} repeat ids: {sorted(ids)}")
    if problems:
        raise ConfigError("; ".join(problems))
    return [{"id": c["id"], "name": c["name"]} for c in sorted(categories, key=lambda c: c["id"])]


def vocabulary_words(cfg: ClipConfig, categories: Sequence[dict[str, Any]]) -> list[str]:
    """The words written into the templates: ``clip.words``, or the class names of ``categories``."""
    return [str(c["name"]) for c in categories] if cfg.vocabulary == "classes" else list(cfg.words)


def closest_categories(queries: Tensor, class_embeddings: Tensor, category_ids: Sequence[int]) -> Tensor:
    """The category of each mask (module docstring, step 4): the class whose text embedding is closest.

    Args:
        queries: float [L, D], the masks' pooled CLIP features e_l.
        class_embeddings: float [C, D], the text embeddings of the C class names.
        category_ids: the C COCO category ids, in the order of ``class_embeddings``.

    Returns:
        int64 [L] COCO category ids, c_l = category_ids[argmax_v cos(e_l, T_v)], on ``queries``' device.
    """
    ids = torch.tensor(list(category_ids), dtype=torch.int64, device=queries.device)
    if queries.shape[0] == 0:
        return ids[:0]
    similarity = F.normalize(queries.float(), dim=1) @ F.normalize(class_embeddings.float(), dim=1).T  # (L, C)
    return ids[similarity.argmax(1)]


def clip_model_config(name: str) -> dict[str, Any]:
    """The open_clip model config of ``clip.model``: a built-in config name or a local JSON file.

    Args:
        name: e.g. "ViT-B-16", or a path ending in .json holding an open_clip model config
            (``embed_dim``, ``vision_cfg``, ``text_cfg``, ...), bare or under a ``model_cfg`` key.

    Returns:
        A fresh dict of the config.

    Raises:
        FileNotFoundError: a .json path that does not exist.
        ConfigError: an unknown name, a hub schema, or a config that would need the network (Hugging Face
            tokenizer or text tower, timm vision tower, SigLIP tokenizer).
    """
    if name.endswith(".json"):
        path = Path(name)
        if not path.is_file():
            raise FileNotFoundError(f"clip.model={name}: no such open_clip config file")
        try:
            config = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ConfigError(f"clip.model={name} is not valid JSON ({err})") from err
        config = config.get("model_cfg", config) if isinstance(config, dict) else config
    elif ":" in name:
        raise ConfigError(
            f"clip.model={name!r}: schemas such as hf-hub: or local-dir: are not supported (they can download); "
            "give a built-in open_clip config name or a local .json config, and the weights as clip.weights"
        )
    else:
        import open_clip

        config = open_clip.get_model_config(name)
        if config is None:
            close = difflib.get_close_matches(name, open_clip.list_models(), n=3)
            raise ConfigError(
                f"clip.model={name!r} is neither a built-in open_clip config (did you mean {close}?) nor a .json file"
            )
    if not isinstance(config, dict) or not all(key in config for key in ("embed_dim", "vision_cfg", "text_cfg")):
        raise ConfigError(f"clip.model={name}: an open_clip config needs embed_dim, vision_cfg and text_cfg")
    for section, keys in _HUB_KEYS.items():
        found = [key for key in keys if key in config[section]]
        if found:
            raise ConfigError(
                f"clip.model={name}: {section}.{found[0]} makes open_clip load from the Hugging Face hub or timm; "
                "only CLIP ViTs with open_clip's own towers and tokenizer are supported"
            )
    if "multimodal_cfg" in config or "siglip" in Path(name).stem.lower():
        raise ConfigError(f"clip.model={name}: CoCa and SigLIP models are not supported (their tokenizers download)")
    return config


@contextlib.contextmanager
def _hub_offline() -> Iterator[None]:
    """Put huggingface_hub in offline mode (its env var and its already-read constant), then restore both."""
    previous = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    constants = None
    with contextlib.suppress(ImportError):
        from huggingface_hub import constants
    saved = getattr(constants, "HF_HUB_OFFLINE", None)
    if constants is not None:
        constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = previous
        if constants is not None:
            constants.HF_HUB_OFFLINE = saved


def check_clip_setup(cfg: ClipConfig) -> dict[str, Any]:
    """Everything about the ``clip`` section that can be checked without reading the weights.

    Args:
        cfg: the ``clip`` section.

    Returns:
        The open_clip model config of ``clip.model`` (see `clip_model_config`).

    Raises:
        ImportError: open_clip is not installed.
        ConfigError: see `check_clip_config`, `vocabulary_categories` and `clip_model_config`.
        FileNotFoundError: ``clip.weights``, a JSON ``clip.model`` or ``clip.categories`` does not exist.
    """
    check_clip_config(cfg)
    vocabulary_categories(cfg)  # a clip.categories json that does not load fails here, not in every actor
    try:
        import open_clip  # noqa: F401
    except ImportError as err:
        raise ImportError("propose.proposer=clip needs open_clip: pip install 'sp-ray[clip]'") from err
    config = clip_model_config(cfg.model)
    if cfg.weights is not None and not Path(cfg.weights).is_file():
        raise FileNotFoundError(
            f"clip.weights={cfg.weights}: no such file; give a local open_clip weights file of clip.model={cfg.model} "
            "(nothing is downloaded)"
        )
    return config


def load_clip_model(cfg: ClipConfig, *, seed: int = 0) -> tuple[nn.Module, Callable[[list[str]], Tensor]]:
    """The CLIP model of ``clip.model`` with the weights of ``clip.weights``, in eval mode, and its tokenizer.

    Args:
        cfg: the ``clip`` section.
        seed: draws the random init when ``clip.weights`` is null (``clip.allow_random``), so every actor and
            every rerun holds the same network.

    Returns:
        (model, tokenizer): an open_clip CLIP / CustomTextCLIP on the CPU (float32) and a callable from a
        list of strings to int64 [n, context_length] token ids.

    Raises:
        ImportError / ConfigError / FileNotFoundError: see `check_clip_setup`.
        ValueError: ``clip.weights`` is not a state dict of this model.
    """
    config = check_clip_setup(cfg)
    import open_clip
    from open_clip.tokenizer import SimpleTokenizer

    model_class = open_clip.CustomTextCLIP if config.pop("custom_text", False) else open_clip.CLIP
    with _hub_offline(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_class(**config)
        if cfg.weights is not None:
            try:
                open_clip.load_checkpoint(model, cfg.weights, strict=True, weights_only=True)
            except (RuntimeError, KeyError, ValueError, OSError, pickle.UnpicklingError) as err:
                raise ValueError(
                    f"clip.weights={cfg.weights} is not an open_clip state dict of clip.model={cfg.model} ({err})"
                ) from err
    text_cfg = config["text_cfg"]
    tokenizer = SimpleTokenizer(
        context_length=text_cfg.get("context_length", 77), **text_cfg.get("tokenizer_kwargs", {})
    )
    return model.eval(), tokenizer


def text_embeddings(
    model: nn.Module,
    tokenizer: Callable[[list[str]], Tensor],
    words: Sequence[str],
    templates: Sequence[str],
    *,
    device: torch.device,
) -> Tensor:
    """CLIP's prompt-ensembled text embedding of each word (step 2).

    Args:
        model: an open_clip CLIP (``encode_text``).
        tokenizer: its tokenizer.
        words: V words.
        templates: T strings with one "{}".
        device: where the model runs.

    Returns:
        float [V, D], each row the L2-normalised mean of the word's L2-normalised template embeddings.
    """
    if not words:
        raise ValueError("text_embeddings needs at least one word")
    prompts = prompt_texts(words, templates)
    encoded = model.encode_text(tokenizer(prompts).to(device), normalize=True).float()  # (V*T, D)
    return F.normalize(encoded.reshape(len(words), len(templates), -1).mean(1), dim=1)


def prompt_texts(words: Sequence[str], templates: Sequence[str]) -> list[str]:
    """The text prompts of a vocabulary: every word in every template, word-major ([V * T] strings)."""
    return [template.format(word) for word in words for template in templates]


def produce_proposals(
    features: Tensor,
    words: Tensor,
    background: Tensor,
    image_size: tuple[int, int],
    *,
    mask_threshold: float = 0.5,
    min_area: int = 2,
    sigma: float = 2.0,
    top_k: int = 20,
    max_box_width: float = 0.95,
    min_score: float = 0.5,
) -> Proposals:
    """Pseudo masks of one image from its word activation maps (module docstring, step 3 ``produce``).

    Args:
        features: float [D, h, w], the dense CLIP features X of the image (normalised here per cell).
        words: float [V, D], object word embeddings T (normalised here).
        background: float [U, D], background word embeddings; U = 0 turns the background test off.
        image_size: (H, W) of the output masks, the original image size; the grid must cover the image
            exactly (it does for the stretched CLIP input).
        mask_threshold: binarisation threshold of the min-max normalised activation, at grid and image size.
        min_area: grid cells a component needs.
        sigma: Gaussian Matrix NMS strength.
        top_k: candidates kept after NMS.
        max_box_width: drop masks whose box spans this share of W or more.
        min_score: drop masks whose decayed maskness is below this.

    Returns:
        ``Proposals``: masks bool [L, H, W], scores [L] (decayed maskness), boxes [L, 4] xyxy, queries [L, D]
        (normalised mean dense feature inside the component), best first, on ``features``' device.

    Raises:
        ValueError: features not [D, h, w] or non-finite, embeddings of another width, or a bad image size.
    """
    if features.dim() != 3:
        raise ValueError(f"features must be [D, h, w] of one image, got shape {tuple(features.shape)}")
    channels, h, w = features.shape
    for name, embeddings in (("words", words), ("background", background)):
        if embeddings.dim() != 2 or embeddings.shape[1] != channels:
            raise ValueError(f"{name} must be [n, {channels}] embeddings, got shape {tuple(embeddings.shape)}")
    height, width = (int(side) for side in image_size)
    if height <= 0 or width <= 0:
        raise ValueError(f"image_size must be positive (H, W), got {image_size}")
    if not bool(torch.isfinite(features).all()):
        raise ValueError("CLIP features hold NaN or inf; check clip.weights and the input image")
    keys = F.normalize(features.float().reshape(channels, h * w), dim=0)  # (D, h*w)
    similarity = F.normalize(words.float(), dim=1) @ keys  # (V, h*w)
    low = similarity.amin(1, keepdim=True)
    soft = (similarity - low) / (similarity.amax(1, keepdim=True) - low).clamp_min(1e-12)
    foreground = soft >= mask_threshold
    if background.shape[0]:
        foreground &= similarity > (F.normalize(background.float(), dim=1) @ keys).amax(0)

    # Connected components of every word's foreground are the candidates.
    components, owners = [], []
    for word, grid in enumerate(foreground.reshape(-1, h, w).cpu().numpy()):
        labels, count = ndimage.label(grid, structure=_EIGHT_CONNECTED)
        for label in range(1, count + 1):
            component = labels == label
            if component.sum() >= min_area:
                components.append(component.reshape(-1))
                owners.append(word)
    if not components:
        return _empty(features.device, channels, (height, width))
    binary = torch.from_numpy(np.stack(components)).to(features.device)  # (M, h*w)
    area = binary.sum(1)
    soft = soft[torch.tensor(owners, device=features.device)] * binary  # (M, h*w), zero off the component
    maskness = soft.sum(1) / area
    queries = F.normalize(binary.float() @ keys.T, dim=1)  # (M, D): the mean direction inside

    masks, scores, boxes, queries = nms_top_k_masks(
        soft, binary, maskness, queries, grid=(h, w), image_size=(height, width), sigma=sigma, top_k=top_k,
        mask_threshold=mask_threshold,
    )
    keep = masks.flatten(1).any(1) & (boxes[:, 2] - boxes[:, 0] < max_box_width * width) & (scores >= min_score)
    return Proposals(masks=masks[keep], scores=scores[keep], boxes=boxes[keep], queries=queries[keep])


def rescore_proposals(
    proposals: Proposals,
    features: Tensor,
    words: Tensor,
    background: Tensor,
    *,
    min_similarity: float = 0.2,
) -> Proposals:
    """Keep the proposals in which CLIP sees an object word (module docstring, step 3 ``rescore``).

    Args:
        proposals: masks bool [L, H, W] at image size (e.g. saliency proposals), boxes [L, 4].
        features: float [D, h, w], the dense CLIP features of the same image; the grid covers the image.
        words: float [V, D] object word embeddings.
        background: float [U, D] background word embeddings; U = 0 turns the background test off.
        min_similarity: the best word cosine a mask needs.

    Returns:
        ``Proposals`` ranked by their new score, the best word cosine s_l = max_v cos(e_l, T_v) of the
        mask's pooled feature e_l (the normalised area-weighted mean of the normalised dense features);
        queries are the e_l [L', D].
    """
    channels, h, w = features.shape
    keys = F.normalize(features.float().reshape(channels, h * w), dim=0)  # (D, h*w)
    if proposals.masks.shape[0] == 0:
        return _empty(features.device, channels, tuple(proposals.masks.shape[1:]))
    masks = proposals.masks.to(features.device)
    # Area pooling gives each grid cell the share of it that the mask covers.
    coverage = torch.stack([F.adaptive_avg_pool2d(mask[None, None].float(), (h, w)).flatten() for mask in masks])
    pooled = F.normalize(coverage @ keys.T, dim=1)  # (L, D)
    best = (pooled @ F.normalize(words.float(), dim=1).T).amax(1)
    keep = best >= min_similarity
    if background.shape[0]:
        keep &= best > (pooled @ F.normalize(background.float(), dim=1).T).amax(1)
    index = keep.nonzero().flatten()
    index = index[best[index].argsort(descending=True, stable=True)]
    return Proposals(
        masks=masks[index], scores=best[index], boxes=proposals.boxes.to(features.device)[index], queries=pooled[index]
    )


def _empty(device: torch.device, channels: int, size: tuple[int, ...]) -> Proposals:
    return Proposals(
        masks=torch.zeros((0, *size), dtype=torch.bool, device=device),
        scores=torch.zeros(0, device=device),
        boxes=torch.zeros((0, 4), device=device),
        queries=torch.zeros((0, channels), device=device),
    )


def prepare_clip_image(
    pixels: np.ndarray, size: int, mean: Sequence[float], std: Sequence[float], device: torch.device
) -> Tensor:
    """Stretch an image to the square CLIP input (bilinear, antialiased) and normalise it.

    Args:
        pixels: uint8 [H0, W0, 3] RGB.
        size: side of the square input.
        mean: per-channel mean of 0..1 RGB.
        std: per-channel std of 0..1 RGB.
        device: where the result lives.

    Returns:
        float [3, size, size].
    """
    image = torch.from_numpy(np.ascontiguousarray(pixels)).to(device).permute(2, 0, 1).float() / 255  # (3, H0, W0)
    image = F.interpolate(image[None], size=(size, size), mode="bilinear", antialias=True)[0].clamp(0, 1)
    return (image - torch.tensor(mean, device=device).view(3, 1, 1)) / torch.tensor(std, device=device).view(3, 1, 1)


class ClipProposer:
    """A CLIP model as ``propose``'s proposal source (a ``Proposer``): decoded images in, one ``Proposals`` per
    image out.

    Holds the dense image encoder on ``device`` and the word embeddings, computed once (the text tower is
    then dropped). A batch of images is stretched to ``clip.image_size`` squares and run as one forward.
    With ``clip.vocabulary: classes`` the words are the target dataset's class names and every proposal
    carries its closest class (``Proposals.category_ids``).

    Args:
        cfg: the ``clip`` section.
        device: where the image encoder runs.
        seed: the random init's seed when ``clip.weights`` is null.
        saliency: in ``rescore`` mode, the callable giving the proposals to rescore for a batch of decoded
            (item, pixels) pairs (``propose``'s saliency proposals); unused in ``produce`` mode.
        size_rule: the ``propose`` section whose backbone resize (`sp_ray.pretrain.saliency.input_size`) an
            image must fit to be proposed on, as for the saliency proposer; None: any size.

    Attributes:
        backbone: the `ClipDenseEncoder`; its ``out_channels`` give the prompt width D.
        words: the V vocabulary words in the templates (``clip.words`` or the class names).
        categories: the COCO categories of the proposals (`vocabulary_categories`).
        word_embeddings: float [V, D]. background_embeddings: float [U, D].

    Raises:
        ConfigError / FileNotFoundError / ValueError: as `load_clip_model`; an ``image_size`` that is not a
            multiple of the patch size; rescore without ``saliency``.
    """

    def __init__(
        self,
        cfg: ClipConfig,
        *,
        device: torch.device,
        seed: int = 0,
        saliency: Callable[[Ready], list[Proposals]] | None = None,
        size_rule: ProposeConfig | None = None,
    ) -> None:
        model, tokenizer = load_clip_model(cfg, seed=seed)
        self.backbone = ClipDenseEncoder(model.visual).to(device).eval()
        if cfg.image_size % self.backbone.patch_size:
            raise ConfigError(
                f"clip.image_size={cfg.image_size} must be a multiple of the patch size {self.backbone.patch_size}"
            )
        if cfg.mode == "rescore" and saliency is None:
            raise ValueError("clip.mode=rescore needs the saliency proposals to rescore (saliency=...)")
        self._categories = vocabulary_categories(cfg)
        self.words = vocabulary_words(cfg, self._categories)
        model.to(device)
        with torch.inference_mode():
            self.word_embeddings = text_embeddings(model, tokenizer, self.words, cfg.templates, device=device)
            self.background_embeddings = (
                text_embeddings(model, tokenizer, cfg.background_words, cfg.templates, device=device)
                if cfg.background_words
                else torch.zeros((0, self.backbone.out_channels[0]), device=device)
            )
        del model  # only the visual tower, held by the encoder, stays
        self.cfg = cfg
        self.device = device
        self.saliency = saliency
        self.size_rule = size_rule

    @property
    def prompt_width(self) -> int:
        return c5_channels(self.backbone)

    @property
    def categories(self) -> list[dict[str, Any]]:
        return self._categories

    def check_size(self, height: int, width: int) -> None:
        if self.size_rule is not None:
            input_size(height, width, self.size_rule)

    @torch.inference_mode()
    def __call__(self, ready: Ready) -> list[Proposals]:
        """Pseudo masks of decoded images.

        Args:
            ready: (item, uint8 [H0, W0, 3] RGB) pairs of ``propose``'s image list.

        Returns:
            One ``Proposals`` per image: masks bool [L, H0, W0], scores [L], boxes [L, 4] xyxy, queries
            float [L, D] (pooled CLIP features), and with the class vocabulary category_ids int64 [L], on
            the CPU.
        """
        if not ready:
            return []
        cfg = self.cfg
        batch = torch.stack(
            [prepare_clip_image(pixels, cfg.image_size, cfg.mean, cfg.std, self.device) for _, pixels in ready]
        )  # (B, 3, S, S)
        features = self.backbone(batch)[-1].float()  # (B, D, S/p, S/p)
        if cfg.mode == "produce":
            found = [
                produce_proposals(
                    features[row],
                    self.word_embeddings,
                    self.background_embeddings,
                    pixels.shape[:2],
                    mask_threshold=cfg.mask_threshold,
                    min_area=cfg.min_area,
                    sigma=cfg.nms_sigma,
                    top_k=cfg.top_k,
                    max_box_width=cfg.max_box_width,
                    min_score=cfg.min_score,
                )
                for row, (_, pixels) in enumerate(ready)
            ]
        else:
            found = [
                rescore_proposals(
                    proposals,
                    features[row],
                    self.word_embeddings,
                    self.background_embeddings,
                    min_similarity=cfg.min_similarity,
                )
                for row, proposals in enumerate(self.saliency(ready))
            ]
        ids = [category["id"] for category in self._categories]
        return [
            Proposals(
                masks=p.masks.cpu(), scores=p.scores.cpu(), boxes=p.boxes.cpu(), queries=p.queries.cpu(),
                category_ids=(
                    closest_categories(p.queries, self.word_embeddings, ids).cpu()
                    if cfg.vocabulary == "classes" else None
                ),
            )
            for p in found
        ]


def clip_identity(cfg: ClipConfig, *, seed: int = 0) -> dict[str, Any]:
    """What CLIP proposals depend on besides the images, for ``propose``'s shard fingerprints: the ``clip``
    settings, the weights file's size and mtime, a local JSON config's content, the seed of a random init, and
    the categories of the class vocabulary (the content of ``clip.categories``). The object words' vocabulary
    leaves its keys out, so shards proposed before the vocabulary option keep their fingerprints."""
    settings = dataclasses.asdict(cfg)
    if cfg.vocabulary == "objects" and cfg.categories is None and not cfg.class_names:
        for key in ("vocabulary", "categories", "class_names"):
            settings.pop(key)
    identity: dict[str, Any] = {"clip": settings, "seed": seed if cfg.weights is None else None}
    if cfg.vocabulary == "classes":
        identity["categories"] = vocabulary_categories(cfg)
    if cfg.weights is not None and Path(cfg.weights).is_file():
        stat = Path(cfg.weights).stat()
        identity["weights_stamp"] = [stat.st_size, stat.st_mtime_ns]
    if cfg.model.endswith(".json") and Path(cfg.model).is_file():
        identity["model_config_sha256"] = hashlib.sha256(Path(cfg.model).read_bytes()).hexdigest()
    return identity
