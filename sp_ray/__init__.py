"""sp-ray: saliency-prompt pre-training of query-based instance segmenters on Ray."""

__version__ = "0.1.0"
