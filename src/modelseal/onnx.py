"""``modelseal.onnx``: the public name of the onnx loader; it lives in ``modelseal.loaders.onnx``."""

from modelseal.loaders.onnx import inference_session

__all__ = ["inference_session"]
