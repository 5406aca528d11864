"""A tiny GPT-2 teacher for the quality benchmark, pretrained on the benchmark's own training text.

The second teacher of the spike-driven quality goal (the first is SmolLM2-135M): a 2-layer, 128-wide
GPT-2 with SmolLM2's tokenizer, trained from scratch with next-token cross-entropy on the training
books only (the held-out books stay unseen). Saved as an ordinary Hugging Face folder, keyed by its
settings and data, so later runs load it instead of training it again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger("quality_kjv")

SETTINGS = {"n_embd": 128, "n_layer": 2, "n_head": 4, "steps": 600, "batch": 16, "lr": 3e-3, "seed": 0}


def _key(blocks: list[list[int]], vocab: int, n_positions: int) -> str:
    h = hashlib.sha1(json.dumps({**SETTINGS, "vocab": vocab, "n_positions": n_positions}).encode())
    for b in blocks[:: max(1, len(blocks) // 256)]:
        h.update(json.dumps(b).encode())
    h.update(str(len(blocks)).encode())
    return h.hexdigest()[:12]


def tiny_gpt2_teacher(blocks: list[list[int]], tokenizer: Any, root: Path) -> Path:
    """Folder of the pretrained tiny GPT-2 (trained now if absent). blocks: packed training blocks."""
    from transformers import GPT2Config, GPT2LMHeadModel

    n_positions = max(len(b) for b in blocks)
    vocab = len(tokenizer)
    folder = root / f"tiny_gpt2-{_key(blocks, vocab, n_positions)}"
    if (folder / "config.json").is_file():
        return folder
    s = SETTINGS
    torch.manual_seed(s["seed"])
    cfg = GPT2Config(
        vocab_size=vocab,
        n_embd=s["n_embd"],
        n_layer=s["n_layer"],
        n_head=s["n_head"],
        n_positions=n_positions,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        loss_type="ForCausalLM",
    )
    model = GPT2LMHeadModel(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=s["lr"], weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: min(1.0, (i + 1) / 30) * 0.5 * (1 + math.cos(math.pi * i / s["steps"]))
    )
    gen = torch.Generator().manual_seed(s["seed"])
    data = torch.tensor([b for b in blocks if len(b) == n_positions])
    t0 = time.perf_counter()
    model.train()
    for step in range(s["steps"]):
        ids = data[torch.randint(0, len(data), (s["batch"],), generator=gen)]
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % 50 == 0 or step == s["steps"] - 1:
            took = time.perf_counter() - t0
            log.info("tiny GPT-2 teacher step %d/%d loss %.3f (%.0fs)", step + 1, s["steps"], loss.item(), took)
    tmp = folder.with_name(folder.name + ".tmp")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "pretraining.json").write_text(json.dumps({**s, "final_loss": float(loss)}, indent=2) + "\n")
    tmp.rename(folder)
    return folder
