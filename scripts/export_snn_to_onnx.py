#!/usr/bin/env python
"""Export a trained student (student.pt + metadata.json) to ONNX (see `--help`)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from snn_distill.cli import export_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(export_main())
