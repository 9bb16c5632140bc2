"""DenseCL self-supervised pre-training of the ResNet backbone (``sp-ray ssl``).

``model``: the DenseCL model (query and momentum key encoders, global and dense heads, the two queues) and
its losses; ``data``: the unlabeled image folder and the two-view augmentation; ``train``: the epoch loop on
the session interface of ``sp_ray.train`` (a process, torchrun or Ray Train workers) and its Ray Train entry.
The package sits above ``sp_ray.train``; its output, ``final/backbone.pth``, is the ``model.backbone_weights``
of ``propose``, ``pretrain`` and ``finetune``.
"""
