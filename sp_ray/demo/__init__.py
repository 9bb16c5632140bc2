"""``make demo``: the whole sp-ray pipeline on the built-in synthetic dataset, on a local Ray, with a report.

The steps, in order (`sp_ray.demo.pipeline.build_steps`; ``DemoLayout`` names every path under ``out``):

==========  ====================================================================================
data        synthetic shapes (`write_synthetic_dataset`): 400 images of 160 px, 320 train, 80 val
splits      nested 5% and 10% labeled fractions of train (`split_fractions`)
ssl         DenseCL on the train images, no labels (`train_densecl`): the proposal backbone
propose     saliency pseudo masks of the train images (`propose`, Ray Data actors) and their
            recall of the train instances (`pseudo_mask_recall`)
pretrain    SP pre-training of K-Net on the pseudo masks (`run_training`, 2 Ray Train workers)
finetune    K-Net from scratch and from SP, and Mask R-CNN, on each fraction (`fit`, one Ray task
            per run, as many at once as Ray has CPUs); val AP every ``eval_interval`` epochs
evaluate    COCO segm / bbox AP on val of every fine-tuned run (`evaluate_checkpoint`)
kernels     average mask of every K-Net kernel (`analyze_kernels`): scratch, SP pre-trained, SP
export      ONNX with the parity check (`export_checkpoint`): K-Net from SP and Mask R-CNN, largest fraction
onnx        onnxruntime (`export.runtime.Segmenter`): K-Net AP on val, both models on sample val images
throughput  onnxruntime images/s of both exported models, interleaved (`time_interleaved`)
report      figures, ``report.html`` and ``report.md`` (`sp_ray.demo.report.demo_report`)
==========  ====================================================================================

A step is skipped when all its outputs exist (a rerun is fast); ``force`` redoes every step,
``redo`` the named steps and every step after them. Step times go to ``out/steps.json``.

Modules: `settings` (sizes, runs, output layout), `commands` (each step's config overrides and the
equivalent ``sp-ray`` commands), `runner` (skip / force / redo, progress bars), `pipeline` (the steps).
"""

from __future__ import annotations

from sp_ray.demo.pipeline import run_demo
from sp_ray.demo.settings import TINY, DemoLayout, DemoSettings

__all__ = ["TINY", "DemoLayout", "DemoSettings", "run_demo"]
