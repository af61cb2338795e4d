"""Where modelseal keeps its host state: ``$MODELSEAL_HOME`` (default ``~/.modelseal``).

Owns only the location. The keystore, config.toml, the audit key and the host's
rollback state live below it; what each file holds is its owner's business.
"""

from __future__ import annotations

import os
from pathlib import Path


def modelseal_home() -> Path:
    return Path(os.environ.get("MODELSEAL_HOME") or Path.home() / ".modelseal")
