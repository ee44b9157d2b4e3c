"""``python -m fair_forge.explainability.cli``: the same as ``fair-forge-explain``."""

import sys

from . import main

sys.exit(main())
