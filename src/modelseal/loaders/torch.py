"""``modelseal.torch.load``: PyTorch checkpoints (``.pt``/``.bin``) from sealed artifacts.

The checkpoint is decrypted into one in-memory buffer and handed to
``torch.load`` with ``weights_only=True`` unless the caller explicitly says
otherwise: a sealed artifact proves who could encrypt it, not that its pickle
is harmless. A checkpoint that needs arbitrary code is refused with a clear
error. The plaintext buffer is wiped once torch has built its tensors.
"""

from __future__ import annotations

import io
import os
import pickle
from typing import Any

from modelseal.errors import PolicyDenied
from modelseal.keys.service import KeyService
from modelseal.loaders.common import read_member, wipe


class UnsafeCheckpoint(PolicyDenied):
    """The pickle needs more than tensors and plain containers (weights_only refused it)."""


def load(
    path: str | os.PathLike[str],
    *,
    member: str | None = None,
    weights_only: bool = True,
    allow_plaintext: bool = False,
    keys: KeyService | None = None,
    **kwargs: Any,
) -> Any:
    """Like ``torch.load(path, weights_only=True, **kwargs)`` on a sealed checkpoint."""
    import torch

    buf = read_member(path, member, allow_plaintext=allow_plaintext, keys=keys)
    try:
        return torch.load(io.BytesIO(buf), weights_only=weights_only, **kwargs)
    except pickle.UnpicklingError as e:
        if not weights_only:
            raise
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else "unpickling refused"
        raise UnsafeCheckpoint(
            "refusing to load: the checkpoint needs code beyond tensors and plain containers "
            f"(weights_only=True: {first}); pass weights_only=False only if you trust who made it"
        ) from None
    finally:
        wipe(buf)
