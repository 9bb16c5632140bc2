"""DenseCL (Wang et al., CVPR 2021): MoCo-v2 with a second, dense contrastive loss between the views.

A query encoder (ResNet + neck) and its momentum (EMA) copy, the key encoder, embed two augmented
views of each image. The neck has a global head (average pool -> fc -> relu -> fc) and a dense head
(1x1 conv -> relu -> 1x1 conv, applied at every C5 location). The global loss is MoCo-v2's InfoNCE
against a queue of past keys; the dense loss is InfoNCE of every query location against the key
location whose *backbone* feature is most similar (the dense correspondence), with negatives from a
second queue. Following the official code, the dense queue receives one key per image: the dense
head's output of the key view averaged over all locations, then L2-normalised.

Shuffle-BN (MoCo) is not implemented. In one process it is a no-op (shuffling inside one BatchNorm
batch leaves the statistics unchanged); across workers it costs two extra all-gathers of the key
images per step, and each worker here already computes query and key statistics on its own batch.

The ResNet keeps torchvision's names and sits at ``encoder_q.0`` like in the official checkpoints, so
both the full state dict (layout "densecl", prefix ``encoder_q.0.``) and ``export_backbone_weights``
(layout "torchvision") load with ``sp_ray.models.backbone.load_backbone_weights``.
"""

from __future__ import annotations

import copy
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from sp_ray.models.backbone import ResNetBackbone, build_resnet
from sp_ray.models.common import IMAGENET_MEAN, IMAGENET_STD


def info_nce_loss(pos: Tensor, neg: Tensor, temperature: float) -> Tensor:
    """InfoNCE with the positive in column 0 (MoCo eq. 1; DenseCL eqs. 1 and 2).

    ``-log exp(pos / T) / (exp(pos / T) + sum_k exp(neg_k / T))``, averaged over the rows.

    Args:
        pos: float [N], cosine similarity of each query with its positive key.
        neg: float [N, Q], cosine similarities with the negatives.
        temperature: T.

    Returns:
        Scalar float loss.
    """
    logits = torch.cat([pos[:, None], neg], dim=1) / temperature  # (N, 1 + Q)
    target = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
    return F.cross_entropy(logits, target)


def dense_correspondence(q_feats: Tensor, k_feats: Tensor) -> Tensor:
    """Match every query-view location to the key-view location of highest cosine similarity.

    DenseCL eq. 3: ``c_i = argmax_j sim(f_i, f'_j)``, computed on the backbone features (not on the
    projections), as the paper finds this more accurate.

    Args:
        q_feats: float [B, C, S], backbone features of the query view (S = H * W locations).
        k_feats: float [B, C, S'], backbone features of the key view.

    Returns:
        long [B, S], for each query location the index of its key location in 0..S'-1.
    """
    q = F.normalize(q_feats, dim=1)
    k = F.normalize(k_feats, dim=1)
    sim = torch.einsum("bcs,bct->bst", q, k)  # (B, S, S')
    return sim.argmax(dim=2)


def global_contrastive_loss(q: Tensor, k: Tensor, queue: Tensor, temperature: float) -> Tensor:
    """MoCo-v2 InfoNCE of each image's query against its key and the queued negatives (DenseCL eq. 1).

    Args:
        q: float [B, D], L2-normalised query embeddings.
        k: float [B, D], L2-normalised key embeddings (no gradient).
        queue: float [Q, D], L2-normalised negatives.
        temperature: T.

    Returns:
        Scalar float loss.
    """
    pos = (q * k).sum(dim=1)
    neg = q @ queue.t()  # (B, Q)
    return info_nce_loss(pos, neg, temperature)


def dense_contrastive_loss(
    q_dense: Tensor, k_dense: Tensor, match: Tensor, queue: Tensor, temperature: float
) -> Tensor:
    """Dense InfoNCE (DenseCL eq. 2): every query location against its matched key location.

    Args:
        q_dense: float [B, D, S], L2-normalised (over D) dense query embeddings.
        k_dense: float [B, D, S'], L2-normalised dense key embeddings (no gradient).
        match: long [B, S] from ``dense_correspondence``.
        queue: float [Q, D], L2-normalised dense negatives.
        temperature: T.

    Returns:
        Scalar float loss, averaged over all B * S locations.
    """
    index = match[:, None, :].expand(-1, k_dense.shape[1], -1)  # (B, D, S)
    positives = torch.gather(k_dense, 2, index)  # (B, D, S)
    pos = (q_dense * positives).sum(dim=1).reshape(-1)  # (B * S)
    q_flat = q_dense.permute(0, 2, 1).reshape(-1, q_dense.shape[1])  # (B * S, D)
    return info_nce_loss(pos, q_flat @ queue.t(), temperature)


@torch.no_grad()
def gather_from_workers(x: Tensor) -> Tensor:
    """Concatenate ``x`` from every worker in rank order (identity without torch.distributed).

    Every worker must pass the same shape (equal per-worker batches: drop the last partial batch).

    Args:
        x: [N, ...] on this worker's device.

    Returns:
        [N * world_size, ...], no gradient.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)


@torch.no_grad()
def enqueue_(queue: Tensor, ptr: Tensor, keys: Tensor) -> None:
    """FIFO update in place: overwrite the oldest ``len(keys)`` rows of ``queue`` and advance ``ptr``.

    Args:
        queue: float [Q, D] ring buffer.
        ptr: long scalar tensor, index of the oldest row; becomes ``(ptr + N) % Q``.
        keys: float [N, D]; Q must be a multiple of N so that a batch never wraps around the end.

    Raises:
        ValueError: Q is not a multiple of N.
    """
    size, n = queue.shape[0], keys.shape[0]
    if n == 0 or size % n != 0:
        raise ValueError(
            f"ssl.queue_size {size} must be a multiple of the global batch {n} (ssl.batch_size x workers); "
            "change ssl.queue_size or ssl.batch_size"
        )
    start = int(ptr)
    queue[start : start + n] = keys.to(queue.dtype)
    ptr.fill_((start + n) % size)


class DenseCLNeck(nn.Module):
    """Global and dense projection heads on C5 (the official ``DenseCLNeck`` without grid pooling).

    Args:
        in_channels: C of C5.
        hidden_channels: width of the hidden layer of both heads.
        out_channels: D, the embedding width.
    """

    def __init__(self, *, in_channels: int, hidden_channels: int, out_channels: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(in_channels, hidden_channels),
            nn.ReLU(inplace=True),
            nn.Linear(hidden_channels, out_channels),
        )
        self.dense_mlp = nn.Sequential(
            nn.Conv2d(in_channels, hidden_channels, 1),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden_channels, out_channels, 1),
        )
        # The official neck initialises its linear layers with Kaiming (fan_in) and keeps PyTorch's
        # default for the 1x1 convolutions.
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
                nn.init.zeros_(m.bias)

    def forward(self, c5: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Project C5.

        Args:
            c5: float [B, C, H, W].

        Returns:
            (global [B, D], dense [B, D, S] with S = H * W, dense averaged over locations [B, D]),
            all unnormalised.
        """
        global_ = self.mlp(c5.mean(dim=(2, 3)))
        dense = self.dense_mlp(c5).flatten(2)  # (B, D, S)
        return global_, dense, dense.mean(dim=2)


class DenseCLEncoder(nn.Sequential):
    """ResNet (index 0) followed by the DenseCL neck (index 1), as in the official checkpoints."""

    def __init__(self, *, backbone: ResNetBackbone, neck: DenseCLNeck) -> None:
        super().__init__(backbone, neck)

    @property
    def backbone(self) -> ResNetBackbone:
        return self[0]

    @property
    def neck(self) -> DenseCLNeck:
        return self[1]

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Encode a normalised image batch.

        Args:
            x: float [B, 3, H, W], mean/std normalised.

        Returns:
            (C5 [B, C, H/32, W/32], global [B, D], dense [B, D, S], dense mean [B, D]), unnormalised.
        """
        c5 = self.backbone(x)[-1]
        return (c5, *self.neck(c5))


class Embeddings(NamedTuple):
    """One view's embeddings; every field L2-normalised over its channel dim and in float32."""

    feats: Tensor  # [B, C, S] backbone C5 features, for the dense correspondence
    global_: Tensor  # [B, D] global projection
    dense: Tensor  # [B, D, S] dense projection
    dense_mean: Tensor  # [B, D] dense projection averaged over locations (the dense queue's entry)


class DenseCL(nn.Module):
    """DenseCL model: query encoder, EMA key encoder and the two negative queues.

    ``forward`` returns the two weighted loss terms; in training mode it also updates the key encoder
    (before computing the keys) and pushes the keys, gathered from every worker, into the queues.
    The queues are buffers, so they are saved and restored with the state dict.

    Args:
        depth: ResNet depth, 18, 34 or 50.
        init_weights: local backbone file (torchvision / MoCo-v2 / DenseCL layout) or None for random init.
        hidden_dim: hidden width of the projection heads.
        proj_dim: D, embedding width.
        queue_size: Q, negatives per queue.
        momentum: EMA factor m of the key encoder, ``k <- m k + (1 - m) q``.
        temperature: InfoNCE temperature T.
        loss_lambda: weight of the dense loss; the global loss has ``1 - loss_lambda``.
    """

    def __init__(
        self,
        *,
        depth: int,
        init_weights: str | None,
        hidden_dim: int,
        proj_dim: int,
        queue_size: int,
        momentum: float,
        temperature: float,
        loss_lambda: float,
    ) -> None:
        super().__init__()
        if queue_size < 1:
            raise ValueError(f"ssl.queue_size must be positive, got {queue_size}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"ssl.momentum must be in [0, 1), got {momentum}")
        if temperature <= 0:
            raise ValueError(f"ssl.temperature must be positive, got {temperature}")
        if not 0.0 <= loss_lambda <= 1.0:
            raise ValueError(f"ssl.loss_lambda must be in [0, 1], got {loss_lambda}")
        backbone = build_resnet(depth, weights=init_weights, frozen_stages=-1, norm_eval=False)
        neck = DenseCLNeck(
            in_channels=backbone.out_channels[-1], hidden_channels=hidden_dim, out_channels=proj_dim
        )
        self.encoder_q = DenseCLEncoder(backbone=backbone, neck=neck)
        self.encoder_k = copy.deepcopy(self.encoder_q)
        for p in self.encoder_k.parameters():
            p.requires_grad_(False)
        self.momentum = momentum
        self.temperature = temperature
        self.loss_lambda = loss_lambda
        self.register_buffer("queue", F.normalize(torch.randn(queue_size, proj_dim), dim=1))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("dense_queue", F.normalize(torch.randn(queue_size, proj_dim), dim=1))
        self.register_buffer("dense_queue_ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("pixel_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def _embed(self, encoder: DenseCLEncoder, images: Tensor) -> Embeddings:
        x = (images.float() - self.pixel_mean) / self.pixel_std
        c5, global_, dense, dense_mean = encoder(x)
        return Embeddings(
            feats=F.normalize(c5.float().flatten(2), dim=1),
            global_=F.normalize(global_.float(), dim=1),
            dense=F.normalize(dense.float(), dim=1),
            dense_mean=F.normalize(dense_mean.float(), dim=1),
        )

    def encode_query(self, images: Tensor) -> Embeddings:
        """Query embeddings (with gradient) of uint8 or float [B, 3, H, W] images, values 0..255."""
        return self._embed(self.encoder_q, images)

    @torch.no_grad()
    def encode_key(self, images: Tensor) -> Embeddings:
        """Key embeddings (no gradient) of uint8 or float [B, 3, H, W] images, values 0..255."""
        return self._embed(self.encoder_k, images)

    @torch.no_grad()
    def momentum_update_(self) -> None:
        """EMA of the key encoder's parameters towards the query encoder's (MoCo eq. 2)."""
        for q, k in zip(self.encoder_q.parameters(), self.encoder_k.parameters(), strict=True):
            k.lerp_(q.detach(), 1.0 - self.momentum)

    def forward(self, view_q: Tensor, view_k: Tensor) -> dict[str, Tensor]:
        """Both DenseCL losses for a batch of view pairs.

        Args:
            view_q: uint8 or float [B, 3, H, W], first augmented view, values 0..255.
            view_k: same shape, second view of the same images.

        Returns:
            {"loss_global": (1 - lambda) * L_q, "loss_dense": lambda * L_r}, scalar float32 tensors
            whose sum is the DenseCL objective (paper eq. 4).
        """
        if view_q.shape[0] != view_k.shape[0]:
            raise ValueError(
                f"the two views must hold the same images, got shapes {tuple(view_q.shape)} "
                f"and {tuple(view_k.shape)}"
            )
        q = self.encode_query(view_q)
        if self.training:
            self.momentum_update_()
        k = self.encode_key(view_k)
        # Similarities in float32 even under autocast: bf16 logits divided by T = 0.2 lose the ranks
        # of close negatives. Clones: the queues are overwritten below, after autograd saved them.
        with torch.autocast(device_type=view_q.device.type, enabled=False):
            match = dense_correspondence(q.feats.detach(), k.feats)
            loss_global = global_contrastive_loss(q.global_, k.global_, self.queue.clone(), self.temperature)
            loss_dense = dense_contrastive_loss(
                q.dense, k.dense, match, self.dense_queue.clone(), self.temperature
            )
        if self.training:
            enqueue_(self.queue, self.queue_ptr, gather_from_workers(k.global_))
            enqueue_(self.dense_queue, self.dense_queue_ptr, gather_from_workers(k.dense_mean))
        return {
            "loss_global": (1.0 - self.loss_lambda) * loss_global,
            "loss_dense": self.loss_lambda * loss_dense,
        }


def export_backbone_weights(model: nn.Module) -> dict[str, Tensor]:
    """The query encoder's ResNet as a torchvision-layout state dict (no ``fc``), on the CPU.

    Args:
        model: a ``DenseCL`` (or a DDP wrapper of one).

    Returns:
        {torchvision key: tensor}, loadable with ``sp_ray.models.backbone.load_backbone_weights``.
    """
    model = model.module if hasattr(model, "module") else model
    if not isinstance(model, DenseCL):
        raise TypeError(f"export_backbone_weights expects a DenseCL model, got {type(model).__name__}")
    return {name: t.detach().cpu().clone() for name, t in model.encoder_q.backbone.state_dict().items()}
