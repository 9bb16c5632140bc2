"""``sp-ray run``: the whole sp-ray pipeline on a COCO-format set, on a local Ray or ``RAY_ADDRESS``, with a report.

The steps, in order (`sp_ray.run.pipeline.build_steps`; `Layout` names every path under ``out``):

==========  ====================================================================================
data        the labeled json checked and its usable images kept (`prepare_user_data`; the synthetic
            shapes for ``sp-ray demo``), val given or held out, the unlabeled pool linked
splits      nested labeled fractions of train (`split_fractions`), or all of it
ssl         DenseCL on the unlabeled pool (`train_densecl`): the proposal backbone; absent with
            ``--backbone-weights``
propose     saliency pseudo masks of the unlabeled pool (`propose`, Ray Data actors) and, when the
            pool is the train images, their recall of the train instances (`pseudo_mask_recall`)
pretrain    SP pre-training of the model family on the pseudo masks (`run_training`, Ray Train)
finetune    the family from SP and without SP (the same backbone, or from scratch), and the
            Mask R-CNN baseline, on each fraction (`fit`, one Ray task per run on CPUs; Ray Train
            with ``--gpu``); val AP every ``eval_interval`` epochs
evaluate    COCO segm / bbox AP on val of every run, per category with precision-recall curves
kernels     average mask of every kernel (`analyze_kernels`): without SP, SP pre-trained, from SP
export      ONNX with the parity check (`export_checkpoint`): from SP and the baseline, largest fraction
onnx        onnxruntime (`export.runtime.Segmenter`): AP on val, the exported models on sample images
throughput  onnxruntime images/s of the exported models, interleaved (`time_interleaved`)
report      figures, ``report.html`` and ``report.md`` (`sp_ray.run.report.run_report`)
==========  ====================================================================================

Every step reads its resolved config from ``out/configs/STEP.yaml`` (written first, `write_configs`), so the
commands of the report rerun a step by hand. A step is skipped when all its outputs exist and its config is
unchanged (a rerun is fast); ``force`` redoes every step, ``redo`` the named steps and every step after them.
Step times go to ``out/steps.json``.

Modules: `settings` (data, presets, variants, schedules, output layout), `data` (the data checks and step),
`commands` (each step's config and the equivalent ``sp-ray`` commands), `runner` (skip / force / redo, progress
bars), `pipeline` (the steps), `report` (the document, its HTML / Markdown, the figures).
"""

from __future__ import annotations

from sp_ray.run.pipeline import run_pipeline
from sp_ray.run.settings import Layout, RunSettings, SyntheticData, UserData

__all__ = ["Layout", "RunSettings", "SyntheticData", "UserData", "run_pipeline"]
