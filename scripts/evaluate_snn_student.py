#!/usr/bin/env python
"""Evaluate a trained student against its teacher (see `--help`)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from snn_distill.cli import eval_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(eval_main())
