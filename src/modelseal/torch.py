"""``modelseal.torch``: the public name of the torch loader; it lives in ``modelseal.loaders.torch``."""

from modelseal.loaders.torch import UnsafeCheckpoint, load

__all__ = ["UnsafeCheckpoint", "load"]
