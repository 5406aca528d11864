"""`HFBackend`: any Hugging Face causal LM behind the `LLMBackend` interface.

The decode loop reuses the model's `past_key_values`, so each generated token costs one position.
`backend.model(input_ids [B, S])` returns logits [B, S, V] as a plain tensor (the same contract as
`SNNLLMBackend.model` and the ONNX export); the raw Transformers model is `backend.hf_model`.
torch and transformers are imported lazily so this module imports without them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .base import LLMBackend


def _default_device(device: str | None) -> str:
    if device:
        return str(device)
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


class CausalLMLogits:
    """Callable view of a causal LM: `(input_ids [B, S]) -> logits [B, S, V]` float32 tensor.

    Attribute access falls through to the wrapped model (`.config`, `.eval()`, `.parameters()`...).
    """

    def __init__(self, hf_model: Any) -> None:
        self.hf_model = hf_model

    def __call__(self, input_ids: Any, **kwargs: Any) -> Any:
        import torch

        with torch.inference_mode():
            out = self.hf_model(input_ids=input_ids, use_cache=False, **kwargs)
        logits = out.logits if hasattr(out, "logits") else out[0]
        return logits.float()

    def __getattr__(self, name: str) -> Any:
        if name == "hf_model":  # not set yet (during unpickling / copy)
            raise AttributeError(name)
        return getattr(self.hf_model, name)


def _context_length(config: Any) -> int | None:
    for name in ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length", "n_ctx"):
        v = getattr(config, name, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def placed_by_loader(model: Any) -> bool:
    """True for a model whose loader placed its weights: a `device_map` (possibly over several GPUs) or
    quantized weights (bitsandbytes). Moving it with `.to()` would collapse the map onto one device or
    fail on older bitsandbytes versions."""
    return bool(getattr(model, "hf_device_map", None)) or bool(getattr(model, "is_quantized", False))


def _input_device(model: Any) -> Any:
    """Where input ids go: the input embedding's device (the first device of a device_map)."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    weight = getattr(emb, "weight", None)
    return weight.device if weight is not None else getattr(model, "device", None)


class HFBackend(LLMBackend):
    """Wraps an already-loaded Transformers causal LM and its tokenizer.

    `HFBackend(model, tokenizer, device=None, max_context=None)`; or
    `HFBackend.from_pretrained(name_or_path, device=None, dtype="auto")` to load both (offline-safe:
    with `HF_HUB_OFFLINE=1` only the local cache is used).
    A model placed by its loader (`hf_device_map` or quantized weights) is never moved: `device` is
    then ignored and inputs go to its input embedding's device.
    """

    def __init__(self, model: Any, tokenizer: Any, device: str | None = None, max_context: int | None = None):
        super().__init__()
        import torch

        if placed_by_loader(model):
            self.device = torch.device(_input_device(model) or "cpu")
            self.hf_model = model.eval()
        else:  # no device given: keep the model where it already is
            self.device = torch.device(device or getattr(model, "device", None) or "cpu")
            self.hf_model = model.to(self.device).eval()
        self.model = CausalLMLogits(self.hf_model)
        self.tokenizer = tokenizer
        self.max_context = max_context or _context_length(getattr(model, "config", None))

    @classmethod
    def from_pretrained(
        cls, name_or_path: str, device: str | None = None, dtype: str = "auto", **model_kwargs: Any
    ) -> HFBackend:
        """dtype: "auto" (bf16 on CUDA, fp32 on CPU), "float32", "bfloat16" or "float16"; the weights
        are loaded in it (no fp32 copy first). Extra keyword arguments go to `from_pretrained`."""
        import torch
        from transformers import AutoModelForCausalLM

        from ..teacher import resolve_dtype
        from ..tokenizer import hub_kwargs, load_hf_tokenizer

        device = _default_device(device)
        kw = {**hub_kwargs(), **model_kwargs}
        if "dtype" not in kw and "torch_dtype" not in kw:
            kw["dtype"] = dtype if isinstance(dtype, torch.dtype) else resolve_dtype(dtype, torch.device(device))
        model = AutoModelForCausalLM.from_pretrained(name_or_path, **kw)
        tokenizer = load_hf_tokenizer(name_or_path)
        return cls(model, tokenizer, device=device)

    # ---- hooks ------------------------------------------------------------------------------
    @property
    def eos_token_id(self) -> int | list[int] | None:
        gen = getattr(self.hf_model, "generation_config", None)
        eos = getattr(gen, "eos_token_id", None) if gen is not None else None
        if eos is None:
            eos = getattr(self.tokenizer, "eos_token_id", None)
        return eos

    @property
    def bos_token_id(self) -> int | None:
        return getattr(self.tokenizer, "bos_token_id", None)

    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text))

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def _forward(self, ids: list[int], past: Any) -> tuple[Any, Any]:
        import torch

        x = torch.tensor([ids], dtype=torch.long, device=self.device)
        with torch.inference_mode():
            out = self.hf_model(input_ids=x, past_key_values=past, use_cache=True)
        return out.past_key_values, out.logits[0, -1].float()

    def _start(self, prompt_ids: list[int]) -> tuple[Any, Any]:
        return self._forward(prompt_ids, None)

    def _advance(self, state: Any, token_id: int) -> tuple[Any, Any]:
        return self._forward([token_id], state)


__all__ = ["CausalLMLogits", "HFBackend", "placed_by_loader"]
