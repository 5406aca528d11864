"""Entry point named in the training guide: `from src.llm_snn_backend import SNNLLMBackend`.

Re-exports the backends from `snn_distill.backends`; importing this module needs neither torch nor
transformers (without them `SNNLLMBackend` runs as a stub with the whitespace tokenizer).
"""

from __future__ import annotations

import sys
from pathlib import Path

try:
    import snn_distill  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`: use the repo copy
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from snn_distill.backends.base import LLMBackend, sample_next_token  # noqa: E402
from snn_distill.backends.hf import HFBackend  # noqa: E402
from snn_distill.backends.snn import ArtifactError, SNNLLMBackend  # noqa: E402

__all__ = ["ArtifactError", "HFBackend", "LLMBackend", "SNNLLMBackend", "sample_next_token"]
