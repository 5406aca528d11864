"""Shared fixtures: tiny real teachers (Llama and GPT-2 architectures) built and saved inside the tests."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# The Hub is unreachable on CI machines; fail fast instead of retrying.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def build_tiny_tokenizer(vocab_size: int = 384):
    """A byte-level BPE trained on the synthetic prompts, wrapped as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from snn_distill.data import synthetic_prompts

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(synthetic_prompts(), trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>", unk_token="<|endoftext|>"
    )


def build_tiny_llama(vocab_size: int, seed: int = 0, hidden: int = 32, layers: int = 2):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(cfg).eval()


def pretrain_briefly(model, tokenizer, steps: int = 120, seq: int = 32, lr: float = 1e-2, seed: int = 0):
    """A few hundred milliseconds of next-token training on the synthetic prompts, so the teacher has
    real, learnable structure (a random teacher's distribution is close to noise)."""
    import torch

    from snn_distill.data import synthetic_prompts

    g = torch.Generator().manual_seed(seed)
    ids = torch.tensor(tokenizer(" ".join(synthetic_prompts()))["input_ids"])
    n = (len(ids) // seq) * seq
    blocks = ids[:n].view(-1, seq)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    for _ in range(steps):
        batch = blocks[torch.randint(0, len(blocks), (16,), generator=g)]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    return model.eval()


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return build_tiny_tokenizer()


@pytest.fixture(scope="session")
def tiny_teacher_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    """A saved tiny Llama teacher folder with its tokenizer (no pad token, like many real LMs)."""
    d = tmp_path_factory.mktemp("tiny_llama")
    model = pretrain_briefly(build_tiny_llama(len(tiny_tokenizer)), tiny_tokenizer)
    model.save_pretrained(d)
    tiny_tokenizer.save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(1)
    d = tmp_path_factory.mktemp("tiny_gpt2")
    cfg = GPT2Config(vocab_size=len(tiny_tokenizer), n_embd=32, n_layer=2, n_head=2, n_positions=128)
    GPT2LMHeadModel(cfg).save_pretrained(d)
    tiny_tokenizer.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op torch thread for a module (`pytestmark = pytest.mark.usefixtures("one_thread")`):
    with tiny models it is as fast, and it does not thrash when the cores are shared."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SNN_DISTILL_CACHE", str(tmp_path / "cache"))


def save_tiny_student(folder: Path, tokenizer, student_type: str = "snn", seed: int = 0, dim: int = 32,
                      mode: str = "hybrid", **kw) -> Path:  # fmt: skip
    """Save a tiny random student (depth 2, 4 heads, 2 KV heads, T=4; `kw`: more StudentConfig fields),
    its residual branches scaled up so that greedy output varies with context. Returns its student.pt."""
    import torch

    from snn_distill.artifacts import build_metadata, save_artifacts
    from snn_distill.config import StudentConfig
    from snn_distill.student import SpikingStudentLM

    torch.manual_seed(seed)
    cfg = StudentConfig(vocab_size=len(tokenizer), dim=dim, depth=2, num_heads=4, num_kv_heads=2, num_timesteps=4,
                        student_type=student_type, mode=mode, **kw)  # fmt: skip
    model = SpikingStudentLM(cfg)
    with torch.no_grad():
        for blk in model.blocks:
            blk.attn.proj.weight.normal_(0, 0.3)
            blk.mlp.down.weight.normal_(0, 0.3)
    meta = build_metadata(cfg, model.num_parameters(), {}, {"tokenizer_name": "tiny-test-bpe"},
                          {"steps": 0, "avg_loss": 0.0}, git_tracking=False)  # fmt: skip
    save_artifacts(folder, model.state_dict(), meta, tokenizer=tokenizer)
    return folder / "student.pt"
