"""``python -m modelseal.cli``: the same as the ``modelseal`` command."""

import sys

from modelseal.cli import main

sys.exit(main())
