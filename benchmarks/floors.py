"""Shared pieces of the AES floors that reads.py and load.py measure: running one job on
every core at once, and the ciphertext chunks of a sealed file held in memory."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

CORES = os.cpu_count() or 1


def on_every_core(work: Callable[[int], None]) -> float:
    """Run ``work(k)`` for k in 0..CORES-1, one thread each (k = 0 on the caller); seconds taken."""
    t = time.perf_counter()
    others = [threading.Thread(target=work, args=(k,)) for k in range(1, CORES)]
    for th in others:
        th.start()
    work(0)
    for th in others:
        th.join()
    return time.perf_counter() - t


def ciphertext_chunks(sealed: Path, layout: Any) -> list[memoryview]:
    """Every chunk's ciphertext (tag included) of ``sealed``, in memory, in order."""
    cts = []
    with open(sealed, "rb") as f:
        for i in range(layout.count):
            f.seek(layout.offset(i))
            cts.append(memoryview(f.read(layout.plain_len(i) + 16)))
    return cts
