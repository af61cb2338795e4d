"""``modelseal.safetensors``: the public name of the safetensors loader (``modelseal.loaders.safetensors``)."""

from modelseal.loaders.safetensors import SafeOpen, SafetensorsError, TensorSlice, load_file, safe_open

__all__ = ["SafeOpen", "SafetensorsError", "TensorSlice", "load_file", "safe_open"]
