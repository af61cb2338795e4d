"""Hugging Face loaders over sealed model folders: transformers and sentence-transformers.

These libraries insist on a directory path. ``loading.memfd_view`` gives them
one whose entries are symlinks to in-memory files (``memfd_create``) holding
the decrypted members, for the duration of the call only: no plaintext is
written to any file system, and nothing is fetched from a hub
(``local_files_only=True`` unless the caller says otherwise).
"""

from __future__ import annotations

import os
from typing import Any

from .keys import KeyService
from .loading import memfd_view


def from_pretrained(
    cls: Any,
    sealed_dir: str | os.PathLike[str],
    *,
    allow_plaintext: bool = False,
    keys: KeyService | None = None,
    **kwargs: Any,
) -> Any:
    """``cls.from_pretrained(plain_dir, **kwargs)`` for a sealed folder (AutoModel, AutoTokenizer, ...)."""
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

    kwargs.setdefault("local_files_only", True)
    with memfd_view(sealed_dir, keys=keys, allow_plaintext=allow_plaintext) as view:
        return SentenceTransformer(str(view), **kwargs)
