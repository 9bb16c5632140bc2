"""The demo's settings: the synthetic data, the tiny preset, K-Net from scratch / from SP and Mask R-CNN."""

from __future__ import annotations

import dataclasses

from sp_ray.run.settings import RunSettings, SyntheticData

# `make demo`. The demo's unlabeled pool is its 320 train images, where benchmarks/low_data.py adds 2000 more:
# the larger pool's DenseCL and proposals alone would take 20 minutes. DenseCL sees 10 x 320 images (the
# benchmark 4 x 2320) and SP pre-training 8 x 320 (3 x 2320), with the same configs and lr steps scaled to
# the epochs. 20 and 12 epochs gave a larger SP gain (+8.2 / +4.5 AP against +2.1 / +1.8 at 5% / 10%) but
# took the demo to 20 minutes on a 2-core Intel Xeon (DenseCL alone 357 s of one core).
DEMO = RunSettings(
    data=SyntheticData(num_images=400, image_size=160),
    preset="tiny", family="knet", variants=("scratch", "sp", "maskrcnn"), fractions=(0.05, 0.1),
    ssl_epochs=10,
    # Backbone input side of propose: 16 x 16 C5 cells for the 160 px images, the size the benchmark's probe
    # picks by recall@0.5 of the labeled-train instances.
    propose_size=512, propose_shard=32, propose_actors=2,
    pretrain_epochs=8, pretrain_workers=2, finetune_epochs=40, eval_interval=5,
    # Mask R-CNN trains at 0.4 images/s against K-Net's 8.5 on a CPU core: its two 2-epoch runs took 215 s
    # of the fine-tuning step's 455 on the Xeon, and at 2 or 4 epochs its AP stays below 1.5 either way.
    maskrcnn_epochs=1,
    # The images hold at most 8 objects, and Mask R-CNN runs its mask head on every kept detection, so 100
    # would make its evaluation 5x dearer.
    detections_per_image=20,
    kernel_images=80, sample_images=4, throughput_warmup=2, throughput_repeats=10, onnx_threads=1,
    invocation=("demo",),
)

_TINY_KNET = ("data.max_size=64", "data.short_size=64", "model.num_kernels=8", "model.feat_channels=32",
              "model.ffn_channels=64", "model.num_heads=2", "model.num_stages=1", "train.batch_size=2",
              "train.warmup_iters=2", "eval.batch_size=4")
# The whole pipeline in about a minute of CPU: what the test suite runs (`sp-ray demo --tiny`).
TINY = dataclasses.replace(
    DEMO, data=SyntheticData(num_images=24, image_size=64), ssl_epochs=1, propose_size=128, propose_shard=8,
    pretrain_epochs=1, finetune_epochs=2, eval_interval=1, maskrcnn_epochs=1, kernel_images=4, sample_images=2,
    throughput_warmup=1, throughput_repeats=2,
    ssl_overrides=("ssl.batch_size=4", "ssl.queue_size=16", "ssl.hidden_dim=32", "ssl.image_size=32"),
    pretrain_overrides=_TINY_KNET, finetune_overrides=_TINY_KNET,
    baseline_overrides=("data.max_size=64", "data.short_size=64", "train.batch_size=2", "train.warmup_iters=2",
                        "eval.batch_size=4"),
    invocation=("demo", "--tiny"),
)
