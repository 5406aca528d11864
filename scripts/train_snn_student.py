#!/usr/bin/env python
"""Distil a Hugging Face causal LM into a spiking student (see `--help`)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from snn_distill.cli import train_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(train_main())
