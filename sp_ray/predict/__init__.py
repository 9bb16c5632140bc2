"""``sp-ray predict``: batch inference of an exported ONNX model as a Ray Data job (the top layer's Ray
Data edge). `pipeline.predict` is the entry point; `actor.PredictActor` and everything it imports are
torch-free (export.runtime, numpy, PIL, av)."""
