"""``modelseal.hf``: the public name of the hf loader; it lives in ``modelseal.loaders.hf``."""

from modelseal.loaders.hf import from_pretrained, pipeline, sentence_transformer

__all__ = ["from_pretrained", "pipeline", "sentence_transformer"]
