"""`python -m snn_distill.serve ...` = `snn-distill serve ...`."""

import sys

from .cli import serve_main

sys.exit(serve_main(prog="python -m snn_distill.serve"))
