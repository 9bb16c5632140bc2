"""The sp-ray metadata of an exported ``.onnx`` file, read on the driver before any session or Ray starts
(``onnx`` only: no onnxruntime), so that a wrong ``--model`` fails in a second with one line."""

from __future__ import annotations

import os

from export.metadata import ModelInfo
from sp_ray.errors import UserError


def read_model_info(path: str) -> ModelInfo:
    """The ``ModelInfo`` of the ``--model`` file of ``sp-ray predict`` and ``sp-ray serve``.

    Raises:
        UserError: the file is missing, is not an ONNX model, or carries no (or broken) sp-ray metadata.
    """
    import onnx

    if not os.path.isfile(path):
        raise UserError(f"--model {path} does not exist; export a model with 'sp-ray export'")
    try:
        model = onnx.load_model(path, load_external_data=False)
    except Exception as err:  # noqa: BLE001 - protobuf's DecodeError and friends: the bytes are not ONNX
        first = (str(err).splitlines() or [type(err).__name__])[0][:120]
        raise UserError(f"--model {path} is not an ONNX model ({first}); pass the .onnx file written by "
                        "'sp-ray export'") from None
    try:
        return ModelInfo.from_props({p.key: p.value for p in model.metadata_props}, where=f"--model {path}")
    except ValueError as err:
        raise UserError(str(err)) from None
