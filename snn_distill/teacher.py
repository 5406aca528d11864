"""Load a frozen teacher: a Hugging Face Hub id, a local model folder, or a local `.gguf` file.

GGUF files are dequantised by transformers on every load (tens of seconds even for a 135M model),
and a GGUF-loaded model refuses `save_pretrained`; so the first load copies the weights into a
plain model of the same config and caches that folder (with its tokenizer) under the cache dir.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .failures import hub_error_message

log = logging.getLogger(__name__)


class TeacherError(RuntimeError):
    """A teacher that cannot be loaded; the message says why and what to do."""


@dataclass
class Teacher:
    model: torch.nn.Module | None  # None until `ensure_model()` after load_teacher(..., load_model=False)
    tokenizer: object
    name: str
    vocab_size: int  # logit width, which can exceed len(tokenizer) (Qwen2.5: 151936 vs 151665)
    source: str  # "hub", "folder" or "gguf"
    load_model_fn: Callable[[], torch.nn.Module] | None = field(default=None, repr=False, compare=False)
    config: Any = field(default=None, repr=False, compare=False)

    def ensure_model(self) -> torch.nn.Module:
        """The model, loaded now if loading was deferred (e.g. a run served by the teacher logit cache)."""
        if self.model is None:
            if self.load_model_fn is None:
                raise TeacherError(f"teacher {self.name} was loaded without its model and cannot load it")
            log.info("loading teacher model %s", self.name)
            try:
                self.model = self.load_model_fn()
            except (OSError, ValueError) as e:
                raise TeacherError(f"cannot load teacher model {self.name}: {str(e).splitlines()[0]}") from e
        return self.model

    @property
    def num_parameters(self) -> int:
        if self.model is None and self.config is not None:  # count on the meta device: loads nothing
            from transformers import AutoModelForCausalLM

            with torch.device("meta"):
                return sum(p.numel() for p in AutoModelForCausalLM.from_config(self.config).parameters())
        return sum(p.numel() for p in self.ensure_model().parameters())

    @torch.inference_mode()
    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """input_ids/attention_mask [B, S] -> logits [B, S, V] in the teacher's dtype."""
        model = self.ensure_model()
        dev = next(model.parameters()).device
        out = model(input_ids=input_ids.to(dev), attention_mask=attention_mask.to(dev), use_cache=False)
        return out.logits


def cache_root() -> Path:
    return Path(os.environ.get("SNN_DISTILL_CACHE", Path.home() / ".cache" / "snn_distill"))


@contextlib.contextmanager
def quiet_transformers():
    """Fold transformers' own loading bars and warnings away; our logging reports instead."""
    import transformers
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        import huggingface_hub.utils as hub_utils

        hub_utils.disable_progress_bars()
    except Exception:  # noqa: BLE001 - optional nicety
        pass
    try:
        yield transformers
    finally:
        hf_logging.set_verbosity(level)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """`auto`: bf16 on CUDA, fp32 on CPU."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def quantization_kwargs(kind: str | None, device: torch.device, dtype: torch.dtype) -> dict:
    """from_pretrained kwargs for bitsandbytes 8-bit or 4-bit (NF4) teacher weights; {} for "none"."""
    if kind in (None, "none"):
        return {}
    if kind not in ("8bit", "4bit"):
        raise TeacherError(f"--teacher-quantization must be none, 8bit or 4bit, got {kind!r}")
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is None:
        raise TeacherError(
            f"--teacher-quantization {kind} needs the bitsandbytes package (pip install bitsandbytes; CUDA "
            "GPUs only); or drop the flag and use --teacher-dtype bfloat16"
        )
    if device.type != "cuda":
        raise TeacherError(
            f"--teacher-quantization {kind} needs the teacher on a CUDA GPU, not {device}; pass "
            "--teacher-device cuda or drop the flag"
        )
    from transformers import BitsAndBytesConfig

    if kind == "8bit":
        qcfg = BitsAndBytesConfig(load_in_8bit=True)
    else:
        compute = dtype if dtype != torch.float32 else torch.bfloat16
        qcfg = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute,
        )
    index = device.index if device.index is not None else torch.cuda.current_device()
    return {"quantization_config": qcfg, "device_map": {"": index}}


def placement_kwargs(device: torch.device, quant: dict) -> dict:
    """from_pretrained kwargs that load the weights straight onto `device`: a CUDA GPU gets
    `device_map={"": index}` (no trip through host memory per torchrun rank); quantized weights keep
    their own map; the CPU needs nothing."""
    if quant:
        return quant
    if device.type != "cuda":
        return {}
    index = device.index if device.index is not None else torch.cuda.current_device()
    return {"device_map": {"": index}}


def _gguf_cache_dir(path: Path) -> Path:
    st = path.stat()
    key = hashlib.sha256(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache_root() / "gguf" / f"{path.stem}-{key}"


def _materialise_gguf(path: Path) -> Path:
    """Dequantise a .gguf once into a plain HF folder (model + tokenizer); return that folder."""
    target = _gguf_cache_dir(path)
    if (target / "config.json").exists():
        return target
    log.info("dequantising %s once, which takes a while (cached in %s)", path.name, target)
    # transformers' GGUF reader draws its own tqdm bar regardless of its verbosity settings.
    with quiet_transformers() as tf, contextlib.redirect_stderr(io.StringIO()):
        try:
            tok = tf.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
            gmodel = tf.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name)
        except ImportError as e:
            raise TeacherError(f"loading {path.name} needs the gguf package: pip install gguf ({e})") from e
        except Exception as e:  # noqa: BLE001 - any parse failure is a bad file for the user
            raise TeacherError(f"cannot read GGUF file {path}: {e}") from e
        plain = tf.AutoModelForCausalLM.from_config(gmodel.config)
        plain.load_state_dict(gmodel.state_dict())
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
        try:
            plain.save_pretrained(tmp)
            tok.save_pretrained(tmp)
            os.replace(tmp, target)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
            if not (target / "config.json").exists():
                raise
    return target


def load_teacher(
    name_or_path: str,
    device: torch.device | str = "cpu",
    dtype: str = "auto",
    revision: str | None = None,
    quantization: str = "none",
    load_model: bool = True,
) -> Teacher:
    """Load a causal LM teacher in eval mode with every parameter frozen.

    quantization: "8bit" / "4bit" load the weights through bitsandbytes (CUDA only).
    load_model=False: tokenizer and config only; `Teacher.ensure_model()` loads the weights when needed."""
    device = torch.device(device)
    path = Path(name_or_path).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise TeacherError(f"teacher GGUF file {path} does not exist; check the path")
        load_from, source = str(_materialise_gguf(path)), "gguf"
    elif path.exists():
        if not path.is_dir() or not (path / "config.json").exists():
            raise TeacherError(
                f"teacher path {path} is not a model folder (no config.json); pass a Hugging Face model "
                "folder, a .gguf file or a Hub id"
            )
        load_from, source = str(path), "folder"
    else:
        load_from, source = name_or_path, "hub"
    torch_dtype = resolve_dtype(dtype, device)
    quant = quantization_kwargs(quantization, device, torch_dtype)
    place = placement_kwargs(device, quant)
    with quiet_transformers() as tf:
        try:
            tokenizer = tf.AutoTokenizer.from_pretrained(load_from, revision=revision)

            def load_model_fn() -> torch.nn.Module:
                with quiet_transformers() as tf2:
                    m = tf2.AutoModelForCausalLM.from_pretrained(
                        load_from, revision=revision, dtype=torch_dtype, **place
                    )
                if not place:  # placed by device_map (bitsandbytes models cannot be moved at all)
                    m.to(device)
                m.eval()
                m.requires_grad_(False)
                return m

            model = load_model_fn() if load_model else None
            if model is not None:
                config = model.config
            else:
                config = tf.AutoConfig.from_pretrained(load_from, revision=revision)
        except OSError as e:
            hub_fix = hub_error_message(name_or_path, e) if source == "hub" else None
            if hub_fix:  # gated or private model, refused token: the user has to act on the Hub
                raise TeacherError(hub_fix) from e
            if source == "hub":
                raise TeacherError(
                    f"teacher {name_or_path!r} is not a local path and could not be fetched from the Hugging "
                    "Face Hub (offline, misspelt, or gated: run `hf auth login` for gated models); pass a local "
                    "folder or .gguf file"
                ) from e
            raise TeacherError(f"cannot load teacher from {load_from}: {str(e).splitlines()[0]}") from e
        except ValueError as e:
            raise TeacherError(f"{name_or_path!r} is not a causal language model: {str(e).splitlines()[0]}") from e
    if tokenizer.pad_token_id is None:
        # Padding positions are masked out of every loss, so any id works; EOS is the usual choice.
        # Without any of them the pad id stays None: batches then pad with id 0 (data.pad_batch), which
        # every teacher has a logit row for, instead of a new <pad> the teacher's logits may not cover.
        fallback = tokenizer.eos_token or tokenizer.unk_token or tokenizer.bos_token
        if fallback is not None:
            tokenizer.pad_token = fallback
    out_emb = model.get_output_embeddings() if model is not None else None
    vocab = int(out_emb.weight.shape[0]) if out_emb is not None else int(config.vocab_size)
    if tokenizer.pad_token_id is not None and tokenizer.pad_token_id >= vocab:
        raise TeacherError(f"tokenizer pad id {tokenizer.pad_token_id} is outside the teacher's {vocab} logits")
    return Teacher(
        model=model,
        tokenizer=tokenizer,
        name=name_or_path,
        vocab_size=vocab,
        source=source,
        load_model_fn=load_model_fn,
        config=config,
    )
