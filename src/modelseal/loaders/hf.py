"""Hugging Face loaders over sealed model folders: transformers and sentence-transformers.

These libraries insist on a directory path. ``loaders.common.memfd_view`` gives them
one whose entries are symlinks to in-memory files (``memfd_create``) holding
the decrypted members, for the duration of the call only: no plaintext is
written to any file system, and nothing is fetched from a hub
(``local_files_only=True`` unless the caller says otherwise).
"""

from __future__ import annotations

import os
from typing import Any

from modelseal.errors import PolicyDenied
from modelseal.keys.service import KeyService
from modelseal.loaders.common import memfd_view


def _no_remote_code(kwargs: dict[str, Any]) -> None:
    if kwargs.get("trust_remote_code"):
        # transformers copies the model's .py files into $HF_HOME/modules on disk (and runs them).
        raise PolicyDenied("trust_remote_code is refused: it would write the sealed model's code to disk and run it")


def from_pretrained(
    cls: Any,
    sealed_dir: str | os.PathLike[str],
    *,
    allow_plaintext: bool = False,
    keys: KeyService | None = None,
    **kwargs: Any,
) -> Any:
    """``cls.from_pretrained(plain_dir, **kwargs)`` for a sealed folder (AutoModel, AutoTokenizer, ...)."""
    _no_remote_code(kwargs)
    kwargs.setdefault("local_files_only", True)
    with memfd_view(sealed_dir, keys=keys, allow_plaintext=allow_plaintext) as view:
        return cls.from_pretrained(str(view), **kwargs)


def pipeline(
    task: str,
    sealed_dir: str | os.PathLike[str],
    *,
    allow_plaintext: bool = False,
    keys: KeyService | None = None,
    **kwargs: Any,
) -> Any:
    """``transformers.pipeline(task, model=plain_dir, **kwargs)`` for a sealed folder."""
    import transformers

    _no_remote_code(kwargs)
    make: Any = transformers.pipeline  # its overloads are per task; ours takes any task
    with memfd_view(sealed_dir, keys=keys, allow_plaintext=allow_plaintext) as view:
        # A local folder: transformers does not consult a hub for it.
        return make(task, model=str(view), **kwargs)


def sentence_transformer(
    sealed_dir: str | os.PathLike[str],
    *,
    allow_plaintext: bool = False,
    keys: KeyService | None = None,
    **kwargs: Any,
) -> Any:
    """A ``SentenceTransformer`` built from a sealed model folder."""
    from sentence_transformers import SentenceTransformer

    _no_remote_code(kwargs)
    kwargs.setdefault("local_files_only", True)
    with memfd_view(sealed_dir, keys=keys, allow_plaintext=allow_plaintext) as view:
        return SentenceTransformer(str(view), **kwargs)
