"""FreeSOLO self-training: selection by hand, prompts by hand, and the round trip train -> re-label -> pre-train."""

from __future__ import annotations

import contextlib
import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from pycocotools.coco import COCO

from sp_ray.cli import main
from sp_ray.config import ConfigError, SelfTrainConfig, load_config
from sp_ray.data.listing import list_images
from sp_ray.data.synthetic import write_synthetic_dataset
from sp_ray.pretrain.propose import proposal_identity
from sp_ray.pretrain.self_training import (
    CheckpointProposer,
    check_selftrain_config,
    load_model_for_self_training,
    maskness,
    pooled_prompts,
    select_pseudo_masks,
)
from sp_ray.pretrain.shards import fingerprint, merge_shards, propose_images, write_shard
from sp_ray.pretrain.sp_objective import build_sp_objective
from sp_ray.train.loop import fit

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
SIZE = 64


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _logit(p: float) -> float:
    return math.log(p / (1 - p))


def _block(y0: int, y1: int, x0: int, x1: int, inside: float) -> torch.Tensor:
    mask = torch.full((8, 8), -10.0)
    mask[y0:y1, x0:x1] = inside
    return mask


def test_select_pseudo_masks_by_hand() -> None:
    p_in = torch.sigmoid(torch.tensor(3.0)).item()  # mask probability inside the confident masks
    cls = torch.tensor([[_logit(0.9)], [_logit(0.8)], [_logit(0.95)], [_logit(0.2)], [_logit(0.6)]])
    masks = torch.stack([
        _block(0, 4, 0, 4, 3.0),  # kept: 0.9 x p_in
        _block(0, 4, 0, 4, 3.0),  # duplicate of 0: Matrix NMS decays 0.8 p_in by exp(-2 * 1^2)
        _block(4, 8, 4, 8, 0.2),  # confident class, soft mask: maskness sigmoid(0.2) = 0.55 < 0.7
        _block(0, 2, 4, 8, 3.0),  # score 0.2 p_in < 0.3
        _block(4, 8, 0, 4, 3.0),  # kept: 0.6 p_in, no overlap with the others
    ])  # fmt: skip
    cfg = SelfTrainConfig()
    torch.testing.assert_close(maskness(masks)[2], torch.sigmoid(torch.tensor(0.2)))
    index, scores = select_pseudo_masks(cls, masks, cfg)
    assert index.tolist() == [0, 4]
    torch.testing.assert_close(scores, torch.tensor([0.9 * p_in, 0.6 * p_in]))
    # A lower threshold keeps the unsure kernel 3 (0.2 p_in) and the decayed duplicate, ranked by decayed score.
    low = SelfTrainConfig(score_threshold=0.1)
    index, scores = select_pseudo_masks(cls, masks, low)
    assert index.tolist() == [0, 4, 3, 1]
    assert scores[3].item() == pytest.approx(0.8 * p_in * math.exp(-2.0), rel=1e-5)
    index, _ = select_pseudo_masks(cls, masks, SelfTrainConfig(max_per_image=1))
    assert index.tolist() == [0]
    # An image whose kernels are all unsure gives nothing.
    index, scores = select_pseudo_masks(torch.full((5, 1), -5.0), masks, cfg)
    assert index.numel() == 0 and scores.numel() == 0


def test_pooled_prompts_by_hand() -> None:
    # C5 of a 64 x 64 input: 2 x 2 cells; masks at stride 8: 8 x 8, 4 x 4 per C5 cell.
    c5 = torch.tensor([[[1.0, 0.0], [0.0, 0.0]], [[0.0, 1.0], [0.0, 0.0]], [[0.0, 0.0], [2.0, 0.0]]])  # (3, 2, 2)
    first_cell = _block(0, 4, 0, 4, 10.0)
    half_two_cells = _block(0, 2, 0, 8, 10.0)  # half of cell (0, 0) and half of cell (0, 1)
    prompts = pooled_prompts(c5, torch.stack([first_cell, half_two_cells]))
    torch.testing.assert_close(prompts[0], torch.tensor([1.0, 0.0, 0.0]))
    torch.testing.assert_close(prompts[1], torch.tensor([1.0, 1.0, 0.0]) / math.sqrt(2.0))
    # An image where no pseudo mask survives has no prompt, not an error.
    assert pooled_prompts(c5, torch.zeros(0, 8, 8)).shape == (0, 3)


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ({"score_threshold": 1.0}, "selftrain.score_threshold"),
        ({"maskness_threshold": 0.0}, "selftrain.maskness_threshold"),
        ({"max_per_image": 0}, "selftrain.max_per_image"),
        ({"max_box_width": 0.0}, "selftrain.max_box_width"),
        ({"nms_sigma": -1.0}, "selftrain.nms_sigma"),
    ],
)
def test_bad_selftrain_settings_are_named(override: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        check_selftrain_config(SelfTrainConfig(**override))


def _tiny(config: str, *extra: str):
    return load_config(
        CONFIGS / "demo" / config,
        [f"data.max_size={SIZE}", f"data.short_size={SIZE}", "data.flip_prob=0.0", "model.frozen_stages=-1",
         "model.num_kernels=8", "model.feat_channels=32", "model.ffn_channels=64", "model.num_heads=2",
         "train.batch_size=3", "train.warmup_iters=2", "train.lr=1e-3", "train.lr_steps=[100]", *extra],
    )  # fmt: skip


# Low thresholds: a model trained for seconds is not confident, and the round trip needs pseudo masks.
LOW = ("selftrain.score_threshold=0.0", "selftrain.maskness_threshold=0.05", "selftrain.max_per_image=5")


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict[str, Path]:
    """Synthetic images and a K-Net fine-tuned on their labels for a few epochs."""
    root = tmp_path_factory.mktemp("selftrain")
    data = write_synthetic_dataset(root / "synthetic", num_images=6, image_size=SIZE, seed=2)
    torch.manual_seed(0)
    cfg = _tiny(
        "knet_tiny_synthetic.yaml", f"data.train_annotations={data['train']}",
        f"data.train_images={data['images']}", "train.epochs=6",
    )  # fmt: skip
    return {**data, "root": root, "checkpoint": fit(cfg, root / "finetune")}


def _self_train(images: Path, out: Path, checkpoint: Path) -> dict:
    """propose --from-checkpoint without Ray: the actor's work on one shard, then the merge."""
    cfg = load_config(None, list(LOW))
    items = list_images(images)
    proposer = CheckpointProposer(checkpoint, cfg.selftrain, device=torch.device("cpu"))
    result = propose_images(items, proposer, cfg.propose)
    shard_fingerprint = fingerprint(proposal_identity(cfg, checkpoint), items)
    write_shard(out / "shards", 0, result, fingerprint=shard_fingerprint)
    return merge_shards(out, [shard_fingerprint])


def _check_pseudo(out: Path, channels: int) -> COCO:
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(out / "annotations.json"))
    anns = coco.loadAnns(sorted(coco.getAnnIds()))
    assert anns and [a["id"] for a in anns] == list(range(1, len(anns) + 1))
    assert coco.loadCats(coco.getCatIds()) == [{"id": 1, "name": "object"}]
    per_image: dict[int, int] = {}
    for ann in anns:
        mask = coco.annToMask(ann)
        image = coco.imgs[ann["image_id"]]
        assert mask.shape == (image["height"], image["width"]) and mask.sum() == ann["area"] > 0
        assert 0 <= ann["score"] <= 1 and ann["bbox"][2] < 0.95 * image["width"]
        per_image[ann["image_id"]] = per_image.get(ann["image_id"], 0) + 1
    assert max(per_image.values()) <= 5
    prompts = np.load(out / "prompts.npy")
    assert prompts.shape == (len(anns), channels) and prompts.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(prompts, axis=1), 1.0, atol=1e-5)
    return coco


def test_round_trip_finetune_relabel_pretrain_relabel(trained: dict[str, Path]) -> None:
    root = trained["root"]
    first = _self_train(trained["images"], root / "round1", trained["checkpoint"])
    assert first["images"] == 6 and first["annotations"] > 0
    _check_pseudo(root / "round1", channels=512)  # ResNet-18 C5

    # sp-ray pretrain trains on them unchanged (prompts.npy next to annotations.json).
    torch.manual_seed(0)
    pretrain = _tiny(
        "knet_tiny_sp_pretrain.yaml", f"data.train_annotations={root / 'round1' / 'annotations.json'}",
        f"data.train_images={trained['images']}", "train.epochs=1",
    )  # fmt: skip
    checkpoint = fit(pretrain, root / "pretrain", objective=build_sp_objective)
    # The next round starts from the pre-training checkpoint (its model.pt holds the plain model).
    model, cfg = load_model_for_self_training(checkpoint)
    assert not cfg.pretrain.enabled and not hasattr(model, "projection")
    second = _self_train(trained["images"], root / "round2", checkpoint)
    assert second["images"] == 6 and second["annotations"] > 0
    _check_pseudo(root / "round2", channels=512)


def test_proposer_matches_the_checkpoint_models_predictions(trained: dict[str, Path]) -> None:
    """The pseudo masks and scores are the checkpoint model's own post-processed predictions, kept by the
    documented rule: score = max class probability x maskness (mean probability inside the mask), kept when
    the maskness passes ``maskness_threshold``, best first. The model is rebuilt here from the checkpoint and
    post-processed with ``sp_ray.models.postprocess`` one kernel at a time (its score is the same product, so
    the proposer's scores must equal it); Matrix NMS is made a no-op by a
    vanishing sigma, and the 64 x 64 images need no evaluation resize."""
    from PIL import Image

    from sp_ray.checkpoint import load_checkpoint
    from sp_ray.models import build_model
    from sp_ray.models.postprocess import postprocess

    cfg = SelfTrainConfig(score_threshold=0.0, maskness_threshold=0.05, max_per_image=8, nms_sigma=1e-9,
                          max_box_width=1.0)  # fmt: skip
    proposer = CheckpointProposer(trained["checkpoint"], cfg, device=torch.device("cpu"))
    ckpt = load_checkpoint(trained["checkpoint"])
    model = build_model(ckpt.config)
    model.load_state_dict(ckpt.model_state)
    model.eval()
    checked = 0
    for path in sorted(Path(trained["images"]).glob("*.png"))[:3]:
        pixels = np.asarray(Image.open(path).convert("RGB"))
        assert pixels.shape[:2] == (SIZE, SIZE)
        (proposals,) = proposer([({"id": 0}, pixels)])
        with torch.inference_mode():
            outputs = model(torch.from_numpy(pixels.copy()).permute(2, 0, 1)[None].float())
        logits, mask_logits = outputs["pred_logits"].float(), outputs["pred_masks"].float()
        stride = SIZE // mask_logits.shape[-1]
        expected = []
        for n in range(logits.shape[1]):
            kernel = {"pred_logits": logits[:, n : n + 1], "pred_masks": mask_logits[:, n : n + 1]}
            (one,) = postprocess(kernel, image_sizes=[(SIZE, SIZE)], orig_sizes=[(SIZE, SIZE)], k=1, mask_stride=stride)
            probs = mask_logits[0, n].sigmoid()
            quality = (probs[probs > 0.5].mean() if (probs > 0.5).any() else torch.tensor(0.0)).item()
            mask = one["masks"][0]
            if quality >= cfg.maskness_threshold and mask.any() and mask.any(0).sum() < SIZE:
                expected.append((one["scores"][0].item(), mask))  # postprocess's score: class prob x maskness
        expected.sort(key=lambda pair: -pair[0])
        assert len(proposals.masks) == len(expected)
        torch.testing.assert_close(proposals.scores, torch.tensor([s for s, _ in expected]), atol=1e-5, rtol=1e-5)
        for got, (_, want) in zip(proposals.masks, expected, strict=True):
            assert torch.equal(got, want)
        checked += len(expected)
    assert checked >= 3  # the comparison is not vacuous


def test_proposer_batched_equals_one_image_at_a_time(trained: dict[str, Path]) -> None:
    """Batched (padded to the largest image) equals one image at a time."""
    cfg = SelfTrainConfig(score_threshold=0.0, maskness_threshold=0.05, max_per_image=5)
    proposer = CheckpointProposer(trained["checkpoint"], cfg, device=torch.device("cpu"))
    from PIL import Image

    pixels = [np.asarray(Image.open(p).convert("RGB")) for p in sorted(Path(trained["images"]).glob("*.png"))[:2]]
    pixels[1] = pixels[1][:48]  # a smaller image: padded in the batch
    items = [({"id": i}, p) for i, p in enumerate(pixels)]
    batched = proposer(items)
    for (item, image), together in zip(items, batched, strict=True):
        (alone,) = proposer([(item, image)])
        assert alone.masks.shape[1:] == image.shape[:2]
        assert torch.equal(alone.masks, together.masks)
        torch.testing.assert_close(alone.scores, together.scores, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(alone.queries, together.queries, atol=1e-4, rtol=1e-4)


def test_fingerprint_follows_the_checkpoint_and_the_selftrain_settings(trained: dict[str, Path]) -> None:
    items = list_images(trained["images"])

    def of(*overrides: str, checkpoint: Path | None = trained["checkpoint"]) -> str:
        return fingerprint(proposal_identity(load_config(None, list(overrides)), checkpoint), items)

    base = of()
    assert base != of(checkpoint=None)  # saliency proposals
    assert base != of("selftrain.max_per_image=3")
    assert base == of("propose.batch_size=1", "propose.min_maskness=0.1")  # not used by self-training


def test_a_mask_rcnn_checkpoint_is_refused(tmp_path: Path) -> None:
    from sp_ray.checkpoint import save_checkpoint
    from sp_ray.models import build_model

    cfg = load_config(CONFIGS / "demo" / "maskrcnn_tiny_synthetic.yaml", ["model.num_classes=2"])
    model = build_model(cfg)
    save_checkpoint(tmp_path / "maskrcnn", model=model, config=cfg, meta={})
    with pytest.raises(ValueError, match="query-based"):
        load_model_for_self_training(tmp_path / "maskrcnn")


@pytest.mark.slow
def test_cli_propose_from_checkpoint_with_ray_and_rerun(trained: dict[str, Path], tmp_path: Path, local_ray, capsys):
    out = tmp_path / "pseudo"
    args = ["propose", "--images", str(trained["images"]), "--out", str(out), "--from-checkpoint",
            str(trained["checkpoint"]), "propose.shard_size=4", "propose.num_actors=1", *LOW]  # fmt: skip
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["images"] == 6 and summary["shards_computed"] == 2 and summary["annotations"] > 0
    _check_pseudo(out, channels=512)
    assert main(args) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["shards_reused"] == 2 and again["annotations"] == summary["annotations"]
    assert main([*args[:-1], "selftrain.max_per_image=4"]) == 0
    assert json.loads(capsys.readouterr().out)["shards_computed"] == 2
    assert main(["propose", "--images", str(trained["images"]), "--out", str(out), "--from-checkpoint",
                 str(tmp_path / "missing")]) == 2  # fmt: skip


@pytest.mark.parametrize("config", ["mask2former_tiny_synthetic.yaml", "queryinst_tiny_synthetic.yaml"])
def test_proposer_reads_every_query_family(config: str, trained: dict[str, Path], tmp_path: Path) -> None:
    """Stride-4 families: masks at image size, prompts of their C5 width, one candidate per query at most."""
    from sp_ray.checkpoint import save_checkpoint
    from sp_ray.models import build_model

    pixel_decoder = ["model.encoder_layers=1"] if config.startswith("mask2former") else []  # Mask2Former's key
    cfg = _tiny(config, "model.num_classes=2", "model.num_stages=2", *pixel_decoder)
    torch.manual_seed(0)
    model = build_model(cfg)
    save_checkpoint(tmp_path / "ckpt", model=model, config=cfg, meta={})
    selftrain = SelfTrainConfig(score_threshold=0.0, maskness_threshold=0.01, max_per_image=20)
    proposer = CheckpointProposer(tmp_path / "ckpt", selftrain, device=torch.device("cpu"))
    image = np.full((SIZE, 48, 3), 90, dtype=np.uint8)
    image[10:40, 8:30] = (200, 40, 40)
    (found,) = proposer([({"id": 1}, image)])
    assert found.masks.shape[1:] == (SIZE, 48) and 0 < found.masks.shape[0] <= 8
    assert found.queries.shape == (found.masks.shape[0], 512)
    assert found.masks.flatten(1).any(1).all()
