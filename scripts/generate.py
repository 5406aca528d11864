#!/usr/bin/env python
"""Stream text from a trained student: generate.py --artifacts DIR "prompt"."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from snn_distill.cli import generate_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(generate_main(prog="generate.py"))
