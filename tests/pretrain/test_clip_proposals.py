"""Language-vision prompts (UPLVP): CLIP pseudo masks with a tiny random open_clip ViT; nothing is downloaded."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import io
import json
import os
import socket
import warnings
from pathlib import Path

import numpy as np
import open_clip  # a dev dependency: without it these tests fail (as the Ray tests do without Ray), never skip
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from sp_ray.cli import main
from sp_ray.config import ClipConfig, Config, ConfigError, load_config
from sp_ray.data.coco import CocoInstanceDataset, DatasetSkipWarning
from sp_ray.data.transforms import build_transforms
from sp_ray.pretrain import clip_proposals
from sp_ray.pretrain.clip_proposals import (
    ClipDenseEncoder,
    ClipProposer,
    check_clip_config,
    clip_model_config,
    load_clip_model,
    prepare_clip_image,
    produce_proposals,
    rescore_proposals,
)
from sp_ray.pretrain.propose import build_proposer, proposal_identity, propose
from sp_ray.pretrain.proposers import Proposals
from sp_ray.pretrain.shards import ShardActor, fingerprint, merge_shards

EMBED = 32
INPUT = 128  # CLIP input side: an 8x8 grid of 16-pixel patches (the config's native grid is 4x4)
HEIGHT, WIDTH = 96, 128  # the test images; the CLIP input stretches them
SQUARE = (slice(24, 72), slice(32, 80))  # grid rows 2..5 (12 px each), columns 2..4 (16 px each)
BLUE, RED = (20, 40, 200), (220, 30, 30)


def _tiny_config(layers: int = 2) -> dict:
    return {
        "embed_dim": EMBED,
        "vision_cfg": {"image_size": 64, "layers": layers, "width": 32, "patch_size": 16, "head_width": 16},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    }


@pytest.fixture(scope="module")
def tiny_json(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("clip") / "tiny_vit.json"
    path.write_text(json.dumps(_tiny_config()))
    return path


def _clip_cfg(tiny_json: Path, **changes) -> ClipConfig:
    settings = {"model": str(tiny_json), "allow_random": True, "image_size": INPUT, "background_words": []}
    return ClipConfig(**{**settings, **changes})


def _square_image() -> np.ndarray:
    pixels = np.empty((HEIGHT, WIDTH, 3), dtype=np.uint8)
    pixels[:] = BLUE
    pixels[SQUARE] = RED
    return pixels


def _blue_image() -> np.ndarray:
    pixels = np.empty((HEIGHT, WIDTH, 3), dtype=np.uint8)
    pixels[:] = BLUE
    return pixels


def _square_truth() -> np.ndarray:
    truth = np.zeros((HEIGHT, WIDTH), dtype=bool)
    truth[SQUARE] = True
    return truth


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


def _features(encoder: ClipDenseEncoder, pixels: np.ndarray, cfg: ClipConfig) -> torch.Tensor:
    with torch.inference_mode():
        image = prepare_clip_image(pixels, cfg.image_size, cfg.mean, cfg.std, torch.device("cpu"))
        return encoder(image[None])[0][0]  # (D, h, w)


def _region_vector(features: torch.Tensor, region: torch.Tensor) -> torch.Tensor:
    keys = F.normalize(features.reshape(features.shape[0], -1), dim=0)
    return F.normalize(keys[:, region.flatten()].mean(1), dim=0)


def _square_cells() -> torch.Tensor:
    cells = torch.zeros(INPUT // 16, INPUT // 16, dtype=torch.bool)
    cells[2:6, 2:5] = True
    return cells


# --- dense features -----------------------------------------------------------------------------------------


def test_dense_features_shape_and_resized_grid(tiny_json: Path) -> None:
    model, _ = load_clip_model(_clip_cfg(tiny_json))
    encoder = ClipDenseEncoder(model.visual).eval()
    assert encoder.out_channels == [EMBED] and encoder.patch_size == 16
    with torch.inference_mode():
        (native,) = encoder(torch.randn(2, 3, 64, 64))
        (larger,) = encoder(torch.randn(1, 3, 128, 96))
    assert native.shape == (2, EMBED, 4, 4) and larger.shape == (1, EMBED, 8, 6)
    assert torch.isfinite(larger).all()
    with pytest.raises(ValueError, match="multiple of the patch size"):
        encoder(torch.randn(1, 3, 72, 64))


def test_last_layer_keeps_patches_apart(tmp_path: Path) -> None:
    # With one layer, the only attention is the last one, which MaskCLIP reads through its value path:
    # a patch's feature then depends on that patch alone, not on the others.
    path = tmp_path / "one_layer.json"
    path.write_text(json.dumps(_tiny_config(layers=1)))
    model, _ = load_clip_model(ClipConfig(model=str(path), allow_random=True))
    encoder = ClipDenseEncoder(model.visual).eval()
    images = torch.randn(1, 3, 64, 64)
    changed = images.clone()
    changed[..., :16, :16] += 3.0  # patch (0, 0) only
    with torch.inference_mode():
        before, after = encoder(images)[0][0], encoder(changed)[0][0]
    moved = (after - before).abs().amax(0)  # (4, 4)
    assert moved[0, 0] > 1e-3
    moved[0, 0] = 0
    assert moved.max() < 1e-5
    # The ordinary forward of the same layer mixes the patches: there the change reaches the other tokens.
    model.visual.output_tokens = True
    with torch.inference_mode():
        mixed = (model.visual(changed)[1] - model.visual(images)[1]).abs().amax(2)[0]  # (16,) per patch token
    assert mixed[1:].min() > 1e-4


# --- produce ------------------------------------------------------------------------------------------------


def _constructed_features(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """8x8 grid: vector a in two separate regions, vector b elsewhere, plus small noise."""
    generator = torch.Generator().manual_seed(seed)
    a, b = F.normalize(torch.randn(2, EMBED, generator=generator), dim=1)
    regions = torch.zeros(8, 8, dtype=torch.bool)
    regions[1:3, 1:4] = True  # 2 x 3 cells
    regions[5:8, 5:7] = True  # 3 x 2 cells, not touching the first
    features = torch.where(regions, a[:, None, None], b[:, None, None])
    features = features + 0.01 * torch.randn(features.shape, generator=generator)
    return features, a, b


def test_produce_recovers_constructed_regions_and_drops_duplicates() -> None:
    features, a, b = _constructed_features()
    # Two object words that both point at a: each finds both regions, and Matrix NMS keeps one copy of each.
    words = torch.stack([a, F.normalize(a + 0.01 * b, dim=0)])
    found = produce_proposals(features, words, torch.zeros(0, EMBED), (64, 96))
    assert found.masks.shape == (2, 64, 96) and found.queries.shape == (2, EMBED)
    truth = torch.zeros(2, 64, 96, dtype=torch.bool)
    truth[0, 8:24, 12:48] = True  # cells (1..2, 1..3) at 8 x 12 pixels per cell
    truth[1, 40:64, 60:84] = True
    pairs = {int(mask.nonzero()[0, 0] >= 32): mask for mask in found.masks}
    for index in (0, 1):  # the region, less a few corner pixels that the bilinear upsampling rounds off
        assert not (pairs[index] & ~truth[index]).any()
        assert (pairs[index] & truth[index]).sum() / truth[index].sum() > 0.9
    assert torch.all(found.scores[:-1] >= found.scores[1:]) and found.scores.min() > 0.9
    assert torch.allclose(found.queries @ a, torch.ones(2), atol=1e-3)
    boxes = {tuple(box.tolist()) for box in found.boxes}
    assert boxes == {(12.0, 8.0, 48.0, 24.0), (60.0, 40.0, 84.0, 64.0)}  # xyxy of the two regions


def test_produce_background_words_and_empty_cases() -> None:
    features, a, b = _constructed_features()
    # The object word loses to a background word equal to it everywhere: nothing is foreground.
    lost = produce_proposals(features, a[None], a[None], (32, 32))
    assert lost.masks.shape == (0, 32, 32) and lost.queries.shape == (0, EMBED) and lost.scores.shape == (0,)
    # A background word b leaves the two regions of a.
    kept = produce_proposals(features, a[None], b[None], (32, 32))
    assert kept.masks.shape[0] == 2
    # Identical features everywhere: no contrast, no mask.
    flat = produce_proposals(b[:, None, None].expand(EMBED, 8, 8), a[None], torch.zeros(0, EMBED), (32, 32))
    assert flat.masks.shape == (0, 32, 32)
    # A region as wide as the image is dropped by max_box_width, a one-cell region by min_area.
    wide = torch.where(torch.arange(8)[:, None].expand(8, 8) < 2, a[:, None, None], b[:, None, None])
    assert produce_proposals(wide, a[None], torch.zeros(0, EMBED), (32, 32)).masks.shape[0] == 0
    dot = torch.where(torch.eye(8, dtype=torch.bool) & (torch.arange(8) == 3), a[:, None, None], b[:, None, None])
    assert produce_proposals(dot, a[None], torch.zeros(0, EMBED), (32, 32)).masks.shape[0] == 0
    with pytest.raises(ValueError, match="NaN"):
        produce_proposals(torch.full((EMBED, 4, 4), float("nan")), a[None], torch.zeros(0, EMBED), (8, 8))
    with pytest.raises(ValueError, match="words must be"):
        produce_proposals(features, torch.zeros(1, EMBED + 1), torch.zeros(0, EMBED), (8, 8))


def test_proposer_recovers_the_region_whose_feature_is_the_word(tiny_json: Path) -> None:
    cfg = _clip_cfg(tiny_json)
    proposer = ClipProposer(cfg, device=torch.device("cpu"))
    square = _square_image()
    # The word embedding is set to the mean CLIP feature of the red square.
    proposer.word_embeddings = _region_vector(_features(proposer.backbone, square, cfg), _square_cells())[None]
    found = proposer([({"id": 1}, square), ({"id": 2}, square[:, ::-1])])
    assert len(found) == 2
    first = found[0]
    assert first.masks.shape[1:] == (HEIGHT, WIDTH) and first.masks.dtype == torch.bool
    assert first.queries.shape[1] == EMBED and first.scores.shape[0] == first.masks.shape[0]
    assert _iou(first.masks[0].numpy(), _square_truth()) > 0.9
    assert first.scores[0] > 0.9 and float(first.queries[0] @ proposer.word_embeddings[0]) > 0.9
    # Batched equals single.
    (single,) = proposer([({"id": 1}, square)])
    assert torch.equal(single.masks, first.masks)
    torch.testing.assert_close(single.scores, first.scores)


# --- rescore ------------------------------------------------------------------------------------------------


def test_rescore_keeps_the_masks_that_match_a_word() -> None:
    features, a, b = _constructed_features()
    masks = torch.zeros(3, 32, 32, dtype=torch.bool)
    masks[0, 4:12, 4:16] = True  # region 1 of a (cells 1..2, 1..3 at 4 px per cell)
    masks[1, 0:4, 24:32] = True  # background b
    masks[2, 20:32, 20:28] = True  # region 2 of a
    proposals = Proposals(masks=masks, scores=torch.ones(3), boxes=torch.zeros(3, 4), queries=torch.zeros(3, 7))
    found = rescore_proposals(proposals, features, a[None], torch.zeros(0, EMBED), min_similarity=0.9)
    assert found.masks.shape[0] == 2 and found.queries.shape == (2, EMBED)
    assert {int(mask.nonzero()[0, 0]) for mask in found.masks} == {4, 20}
    assert torch.all(found.scores > 0.99) and torch.all(found.scores[:-1] >= found.scores[1:])
    # A background word that is a better match removes them; no proposals give none.
    assert rescore_proposals(proposals, features, b[None], a[None], min_similarity=-1).masks.shape[0] == 1
    empty = Proposals(torch.zeros(0, 32, 32, dtype=torch.bool), torch.zeros(0), torch.zeros(0, 4), torch.zeros(0, 7))
    assert rescore_proposals(empty, features, a[None], b[None]).queries.shape == (0, EMBED)


def test_proposer_rescores_the_given_proposals(tiny_json: Path) -> None:
    cfg = _clip_cfg(tiny_json, mode="rescore", min_similarity=0.9)
    square_mask = torch.from_numpy(_square_truth())
    corner = torch.zeros(HEIGHT, WIDTH, dtype=torch.bool)
    corner[:24, :32] = True

    def saliency(ready):
        masks = torch.stack([corner, square_mask])
        return [Proposals(masks, torch.ones(2), torch.zeros(2, 4), torch.zeros(2, 2048)) for _ in ready]

    proposer = ClipProposer(cfg, device=torch.device("cpu"), saliency=saliency)
    square = _square_image()
    proposer.word_embeddings = _region_vector(_features(proposer.backbone, square, cfg), _square_cells())[None]
    (found,) = proposer([({"id": 1}, square)])
    assert found.masks.shape == (1, HEIGHT, WIDTH) and torch.equal(found.masks[0], square_mask)
    assert found.scores[0] > 0.9 and found.queries.shape == (1, EMBED)
    with pytest.raises(ValueError, match="rescore needs"):
        ClipProposer(cfg, device=torch.device("cpu"))


# --- weights, config and the network ------------------------------------------------------------------------


def test_missing_or_wrong_weights_and_bad_models_are_clear_errors(tiny_json: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"clip\.weights=.*nope\.pt: no such file"):
        load_clip_model(_clip_cfg(tiny_json, weights=str(tmp_path / "nope.pt")))
    with pytest.raises(ConfigError, match=r"clip\.weights is null.*clip\.allow_random"):
        load_clip_model(_clip_cfg(tiny_json, allow_random=False))
    wrong = tmp_path / "wrong.pt"
    torch.save({"visual.proj": torch.zeros(3, 3)}, wrong)
    with pytest.raises(ValueError, match=r"clip\.weights=.*wrong\.pt is not an open_clip state dict"):
        load_clip_model(_clip_cfg(tiny_json, weights=str(wrong)))
    with pytest.raises(ConfigError, match=r"clip\.model='hf-hub:org/model'.*not supported"):
        clip_model_config("hf-hub:org/model")
    with pytest.raises(ConfigError, match=r"clip\.model='ViT-B-33'.*ViT-B-32"):
        clip_model_config("ViT-B-33")
    with pytest.raises(ConfigError, match=r"clip\.model=ViT-B-16-SigLIP: vision_cfg\.timm_model_name"):
        clip_model_config("ViT-B-16-SigLIP")
    resnet = tmp_path / "tiny_resnet.json"
    vision = {"image_size": 64, "layers": [1, 1, 1, 1], "width": 8, "head_width": 8}  # a ModifiedResNet
    resnet_cfg = {**_tiny_config(), "vision_cfg": vision}
    resnet.write_text(json.dumps(resnet_cfg))
    with pytest.raises(ConfigError, match=r"clip\.model must be a CLIP ViT.*ModifiedResNet"):
        ClipDenseEncoder(load_clip_model(ClipConfig(model=str(resnet), allow_random=True))[0].visual)
    with pytest.raises(FileNotFoundError, match=r"clip\.model=.*missing\.json"):
        clip_model_config(str(tmp_path / "missing.json"))
    with pytest.raises(ConfigError, match=r"clip\.image_size=120 must be a multiple of the patch size 16"):
        ClipProposer(_clip_cfg(tiny_json, image_size=120), device=torch.device("cpu"))


def test_bad_clip_settings_name_their_keys(tiny_json: Path) -> None:
    for change, key in (
        ({"mode": "both"}, "clip.mode"),
        ({"words": []}, "clip.words"),
        ({"templates": ["a photo"]}, "clip.templates"),
        ({"mask_threshold": 1.0}, "clip.mask_threshold"),
        ({"std": [0.2, 0.0, 0.2]}, "clip.std"),
        ({"top_k": 0}, "clip.top_k"),
    ):
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            check_clip_config(_clip_cfg(tiny_json, **change))


def _raise(*args, **kwargs):
    raise AssertionError("network access attempted")


def test_loading_local_weights_never_touches_the_network(tiny_json: Path, tmp_path: Path, monkeypatch) -> None:
    cfg = _clip_cfg(tiny_json, background_words=["background"])
    reference, tokenizer = load_clip_model(cfg, seed=3)
    weights = tmp_path / "tiny_clip.pt"
    torch.save(reference.state_dict(), weights)

    import huggingface_hub
    from huggingface_hub import constants

    monkeypatch.setattr(socket.socket, "connect", _raise)
    for module in (open_clip.pretrained, open_clip.factory):
        for name in ("download_pretrained", "download_pretrained_from_hf", "download_pretrained_from_url"):
            if hasattr(module, name):
                monkeypatch.setattr(module, name, _raise)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", _raise)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    seen = []
    original = open_clip.load_checkpoint

    def recording(*args, **kwargs):
        seen.append((os.environ.get("HF_HUB_OFFLINE"), constants.HF_HUB_OFFLINE))
        return original(*args, **kwargs)

    monkeypatch.setattr(open_clip, "load_checkpoint", recording)
    offline_before = constants.HF_HUB_OFFLINE
    local = dataclasses.replace(cfg, weights=str(weights), allow_random=False)
    proposer = ClipProposer(local, device=torch.device("cpu"))
    assert seen == [("1", True)]  # the hub was offline while the weights loaded ...
    assert "HF_HUB_OFFLINE" not in os.environ and constants.HF_HUB_OFFLINE == offline_before  # ... and is restored

    # The loaded network is the saved one (another seed would draw other weights).
    square = _square_image()
    with torch.inference_mode():
        expected = _features(ClipDenseEncoder(reference.visual).eval(), square, cfg)
        cpu = torch.device("cpu")
        words = clip_proposals.text_embeddings(reference, tokenizer, cfg.words, cfg.templates, device=cpu)
    torch.testing.assert_close(_features(proposer.backbone, square, cfg), expected)
    torch.testing.assert_close(proposer.word_embeddings, words)
    assert proposer.background_embeddings.shape == (1, EMBED)
    assert len(proposer([({"id": 1}, square)])) == 1


# --- the propose pipeline -----------------------------------------------------------------------------------


def _propose_config(tiny_json: Path, *overrides: str) -> Config:
    return load_config(
        None,
        [
            "propose.proposer=clip",
            "propose.batch_size=2",
            "propose.shard_size=2",
            "propose.num_actors=1",
            f"clip.model={tiny_json}",
            "clip.allow_random=true",
            f"clip.image_size={INPUT}",
            *overrides,
        ],
    )


def _write_images(folder: Path) -> Path:
    folder.mkdir()
    Image.fromarray(_square_image()).save(folder / "a_square.png")
    Image.fromarray(_blue_image()).save(folder / "b_blue.png")
    (folder / "c_broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    return folder


def test_shard_actor_writes_the_propose_format_and_pretraining_loads_it(
    tiny_json: Path, tmp_path: Path, monkeypatch
) -> None:
    folder = _write_images(tmp_path / "images")
    cfg = _propose_config(tiny_json, "clip.words=[object]", "clip.background_words=[background]")
    # The object word is the red square's CLIP feature and the background word the blue field's, so the
    # square image gets the square and the blue image nothing.
    model, _ = load_clip_model(cfg.clip, seed=cfg.train.seed)
    encoder = ClipDenseEncoder(model.visual).eval()
    red = _region_vector(_features(encoder, _square_image(), cfg.clip), _square_cells())
    blue = _region_vector(_features(encoder, _blue_image(), cfg.clip), torch.ones(8, 8, dtype=torch.bool))
    monkeypatch.setattr(
        clip_proposals, "text_embeddings", lambda model, tokenizer, words, templates, device: (
            red if words == ["object"] else blue
        )[None]
    )

    items = [
        {"id": image_id, "file_name": name, "path": str(folder / name), "height": None, "width": None}
        for image_id, name in zip((7, 8, 9), ("a_square.png", "b_blue.png", "c_broken.png"), strict=True)
    ]
    out = tmp_path / "pseudo"
    actor = ShardActor(functools.partial(build_proposer, cfg, None), str(out / "shards"), use_gpu=False,
                       cfg=cfg.propose, max_image_pixels=cfg.data.max_image_pixels)
    fingerprints = ["fp0", "fp1"]
    batch = {
        "shard": np.array([0, 1]),
        "items": np.array([json.dumps(items[:2]), json.dumps(items[2:])]),
        "fingerprint": np.array(fingerprints),
    }
    rows = actor(batch)
    assert rows["images"].tolist() == [2, 0] and rows["failed"].tolist() == [0, 1]
    summary = merge_shards(out, fingerprints)
    assert summary["images"] == 2 and summary["failed"] == 1 and summary["images_without_proposals"] == 1
    assert summary["failed_examples"] == {"missing or unreadable image file": ["c_broken.png"]}

    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(out / "annotations.json"))
    assert coco.loadCats(coco.getCatIds()) == [{"id": 1, "name": "object"}]
    assert sorted(coco.getImgIds()) == [7, 8] and coco.getAnnIds(imgIds=[8]) == []
    anns = coco.loadAnns(coco.getAnnIds())
    assert [ann["id"] for ann in anns] == list(range(1, len(anns) + 1)) and len(anns) >= 1
    assert all(ann["image_id"] == 7 and 0.5 <= ann["score"] <= 1 for ann in anns)
    best = mask_utils.decode(anns[0]["segmentation"]).astype(bool)
    assert best.shape == (HEIGHT, WIDTH) and best.sum() == anns[0]["area"]
    assert _iou(best, _square_truth()) > 0.9
    prompts = np.load(out / "prompts.npy")
    assert prompts.shape == (len(anns), EMBED) and prompts.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(prompts, axis=1), 1.0, atol=1e-5)

    # SP pre-training's dataset reads the pseudo masks with their prompts.
    dataset = CocoInstanceDataset(
        out / "annotations.json",
        folder,
        transforms=build_transforms(train=False, max_size=WIDTH, short_size=HEIGHT),
        extra_per_annotation=prompts,
    )
    _, target = dataset[dataset.image_ids.index(7)]
    assert target["masks"].shape[0] == len(anns) == target["queries"].shape[0]
    np.testing.assert_allclose(target["queries"].numpy(), prompts, atol=1e-6)


def test_proposer_choice_is_checked_and_fingerprinted(tiny_json: Path, tmp_path: Path) -> None:
    saliency = proposal_identity(load_config(None, []))
    assert proposal_identity(load_config(None, ["clip.words=[thing]"])) == saliency  # clip.* is not used
    clip = proposal_identity(_propose_config(tiny_json))
    assert clip != saliency and clip["clip"]["clip"]["model"] == str(tiny_json)
    assert proposal_identity(_propose_config(tiny_json, "clip.words=[thing]")) != clip
    assert proposal_identity(_propose_config(tiny_json, "train.seed=5")) != clip  # the random init's seed
    assert fingerprint(clip, []) != fingerprint(saliency, [])
    folder = _write_images(tmp_path / "images")
    with pytest.raises(ConfigError, match=r"propose\.proposer must be"):
        propose(folder, tmp_path / "out", load_config(None, ["propose.proposer=dino"]))
    with pytest.raises(ConfigError, match="--from-checkpoint"):
        propose(folder, tmp_path / "out", _propose_config(tiny_json), from_checkpoint=tmp_path)
    with pytest.raises(ConfigError, match=r"clip\.weights is null"):
        propose(folder, tmp_path / "out", _propose_config(tiny_json, "clip.allow_random=false"))
    with pytest.raises(FileNotFoundError, match=r"clip\.weights=.*gone\.pt: no such file"):
        propose(folder, tmp_path / "out", _propose_config(tiny_json, f"clip.weights={tmp_path / 'gone.pt'}"))


@pytest.mark.slow
def test_cli_propose_with_clip_through_ray(tiny_json: Path, tmp_path: Path, local_ray, capsys) -> None:
    folder = _write_images(tmp_path / "images")
    out = tmp_path / "pseudo"
    args = ["propose", "--images", str(folder), "--out", str(out), "--proposer", "clip",
            "propose.batch_size=2", "propose.shard_size=2", "propose.num_actors=1", f"clip.model={tiny_json}",
            "clip.allow_random=true", f"clip.image_size={INPUT}", "clip.min_score=0.0", "clip.background_words=[]"]
    with pytest.warns(DatasetSkipWarning, match=r"skipped 1 of 3 images \(missing or unreadable image file: 1"):
        assert main(args) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["images"] == 2 and summary["shards_computed"] == 2 and summary["images_per_s"] > 0
    data = json.loads((out / "annotations.json").read_text())
    prompts = np.load(out / "prompts.npy")
    assert prompts.shape == (len(data["annotations"]), EMBED) and len(data["annotations"]) >= 1
    # The rerun reuses both shards.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DatasetSkipWarning)
        assert main(args) == 0
    assert json.loads(capsys.readouterr().out)["shards_reused"] == 2


# --- the class vocabulary (UPLVP: the target dataset's class names) -------------------------------------------


def _categories_json(folder: Path) -> Path:
    """A COCO json of a target dataset: two categories with COCO-style sparse ids, out of id order."""
    path = folder / "instances_target.json"
    categories = [{"id": 9, "name": "pizza", "supercategory": "food"}, {"id": 5, "name": "kite"}]
    path.write_text(json.dumps({"images": [], "annotations": [], "categories": categories}))
    return path


def test_class_vocabulary_prompts_are_the_class_names(tiny_json: Path, tmp_path: Path, monkeypatch) -> None:
    seen: list[list[str]] = []
    load = clip_proposals.load_clip_model

    def recording(cfg, *, seed=0):
        model, tokenizer = load(cfg, seed=seed)

        def tokenize(texts):
            seen.append(list(texts))
            return tokenizer(texts)

        return model, tokenize

    monkeypatch.setattr(clip_proposals, "load_clip_model", recording)
    templates = ["a photo of a {}.", "a {} in the scene."]
    cfg = _clip_cfg(tiny_json, vocabulary="classes", categories=str(_categories_json(tmp_path)), templates=templates)
    proposer = ClipProposer(cfg, device=torch.device("cpu"))
    # The dataset's categories in id order (how a dataset numbers its labels), each name in every template.
    assert proposer.categories == [{"id": 5, "name": "kite"}, {"id": 9, "name": "pizza"}]
    assert proposer.words == ["kite", "pizza"]
    assert seen == [["a photo of a kite.", "a kite in the scene.", "a photo of a pizza.", "a pizza in the scene."]]
    assert proposer.word_embeddings.shape == (2, EMBED)

    seen.clear()
    listed = ClipProposer(
        _clip_cfg(tiny_json, vocabulary="classes", class_names=["traffic light", "person"], templates=templates[:1]),
        device=torch.device("cpu"),
    )
    assert listed.categories == [{"id": 1, "name": "traffic light"}, {"id": 2, "name": "person"}]
    assert seen == [["a photo of a traffic light.", "a photo of a person."]]
    # The default stays the class-free object words and the one category "object".
    seen.clear()
    objects = ClipProposer(_clip_cfg(tiny_json, words=["object", "thing"], templates=templates[:1]),
                           device=torch.device("cpu"))
    assert objects.categories == [{"id": 1, "name": "object"}] and objects.words == ["object", "thing"]
    assert seen == [["a photo of a object.", "a photo of a thing."]]


def test_each_mask_gets_the_class_closest_to_its_pooled_feature() -> None:
    queries = torch.tensor([[1.0, 0.0], [0.0, 2.0], [0.6, 0.8], [0.8, 0.6]])
    classes = torch.tensor([[0.0, 1.0], [3.0, 0.0]])  # class 5 along y, class 9 along x (norms do not matter)
    found = clip_proposals.closest_categories(queries, classes, [5, 9])
    assert found.dtype == torch.int64 and found.tolist() == [9, 5, 5, 9]
    assert clip_proposals.closest_categories(torch.zeros(0, 2), classes, [5, 9]).tolist() == []


def test_bad_class_vocabularies_are_named(tiny_json: Path, tmp_path: Path) -> None:
    for change, match in (
        ({"vocabulary": "words"}, r"clip\.vocabulary must be one of"),
        ({"vocabulary": "classes"}, r"exactly one of clip\.categories .* or clip\.class_names"),
        ({"vocabulary": "classes", "class_names": ["a"], "categories": "x.json"}, r"exactly one of clip\.categories"),
        ({"class_names": ["dog"]}, r"used only with clip\.vocabulary=classes"),
        ({"vocabulary": "classes", "class_names": ["dog", "cat", "dog"]}, r"clip\.class_names names \['dog'\] more"),
        ({"vocabulary": "classes", "class_names": ["dog", " "]}, r"clip\.class_names must be non-empty strings"),
    ):
        with pytest.raises(ConfigError, match=match):
            check_clip_config(_clip_cfg(tiny_json, **change))
    missing = _clip_cfg(tiny_json, vocabulary="classes", categories=str(tmp_path / "gone.json"))
    with pytest.raises(FileNotFoundError, match=r"clip\.categories=.*gone\.json: no such file"):
        clip_proposals.check_clip_setup(missing)
    no_categories = tmp_path / "images_only.json"
    no_categories.write_text(json.dumps({"images": []}))
    with pytest.raises(ConfigError, match=r"needs a non-empty 'categories' list"):
        clip_proposals.vocabulary_categories(_clip_cfg(tiny_json, vocabulary="classes", categories=str(no_categories)))
    twice = tmp_path / "twice.json"
    twice.write_text(json.dumps({"categories": [{"id": 1, "name": "a"}, {"id": 1, "name": "b"}]}))
    with pytest.raises(ConfigError, match=r"repeat ids"):
        clip_proposals.vocabulary_categories(_clip_cfg(tiny_json, vocabulary="classes", categories=str(twice)))


def test_class_vocabulary_writes_the_dataset_categories_and_pretraining_reads_the_labels(
    tiny_json: Path, tmp_path: Path, monkeypatch
) -> None:
    folder = _write_images(tmp_path / "images")
    target_json = _categories_json(tmp_path)
    cfg = _propose_config(
        tiny_json, "clip.vocabulary=classes", f"clip.categories={target_json}", "clip.background_words=[background]"
    )
    model, _ = load_clip_model(cfg.clip, seed=cfg.train.seed)
    encoder = ClipDenseEncoder(model.visual).eval()
    red = _region_vector(_features(encoder, _square_image(), cfg.clip), _square_cells())
    blue = _region_vector(_features(encoder, _blue_image(), cfg.clip), torch.ones(8, 8, dtype=torch.bool))
    # "pizza" is the red square's CLIP feature, "kite" its opposite (it loses to the background everywhere),
    # the background word the blue field's: the square image gets the square, as a pizza.
    monkeypatch.setattr(
        clip_proposals, "text_embeddings", lambda model, tokenizer, words, templates, device: (
            torch.stack([-red, red]) if words == ["kite", "pizza"] else blue[None]
        )
    )
    items = [
        {"id": image_id, "file_name": name, "path": str(folder / name), "height": None, "width": None}
        for image_id, name in zip((7, 8), ("a_square.png", "b_blue.png"), strict=True)
    ]
    out = tmp_path / "pseudo"
    actor = ShardActor(functools.partial(build_proposer, cfg, None), str(out / "shards"), use_gpu=False,
                       cfg=cfg.propose, max_image_pixels=cfg.data.max_image_pixels)
    actor({"shard": np.array([0]), "items": np.array([json.dumps(items)]), "fingerprint": np.array(["fp"])})
    merge_shards(out, ["fp"])

    data = json.loads((out / "annotations.json").read_text())
    assert data["categories"] == [{"id": 5, "name": "kite"}, {"id": 9, "name": "pizza"}]
    assert len(data["annotations"]) >= 1
    assert {ann["category_id"] for ann in data["annotations"]} == {9}
    best = mask_utils.decode(data["annotations"][0]["segmentation"]).astype(bool)
    assert _iou(best, _square_truth()) > 0.9
    # Pre-training's dataset numbers the classes as the target dataset does: kite 0, pizza 1.
    dataset = CocoInstanceDataset(
        out / "annotations.json", folder, transforms=build_transforms(train=False, max_size=WIDTH, short_size=HEIGHT),
        extra_per_annotation=np.load(out / "prompts.npy"),
    )
    assert dataset.class_names == ["kite", "pizza"]
    _, target = dataset[dataset.image_ids.index(7)]
    assert set(target["labels"].tolist()) == {1} and target["queries"].shape[0] == target["labels"].shape[0]


def test_the_vocabulary_is_part_of_the_shard_fingerprint(tiny_json: Path, tmp_path: Path) -> None:
    objects = proposal_identity(_propose_config(tiny_json))
    # The default vocabulary leaves its keys out of the identity: earlier shards keep their fingerprints.
    assert not {"vocabulary", "categories", "class_names"} & set(objects["clip"]["clip"])
    target_json = _categories_json(tmp_path)
    classes = proposal_identity(_propose_config(tiny_json, "clip.vocabulary=classes", f"clip.categories={target_json}"))
    assert classes != objects
    assert classes["clip"]["categories"] == [{"id": 5, "name": "kite"}, {"id": 9, "name": "pizza"}]
    # The same file with another category is another run.
    target_json.write_text(json.dumps({"categories": [{"id": 5, "name": "kite"}, {"id": 9, "name": "donut"}]}))
    renamed = proposal_identity(_propose_config(tiny_json, "clip.vocabulary=classes", f"clip.categories={target_json}"))
    assert renamed != classes
