"""Layer 6, the loaders: sealed models straight into memory for safetensors, PyTorch, ONNX Runtime,
Hugging Face and fsspec (``sealed::``). No plaintext is written to any file system.

Built on the recipes' ``open``/``open_folder``; the public modules are ``modelseal.safetensors``,
``modelseal.torch``, ``modelseal.onnx`` and ``modelseal.hf``.
"""
