"""How close the student is to its teacher on held-out text (fidelity figures)."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from .data import unigram_counts


def unigram_baseline(blocks: list[list[int]], vocab_size: int, alpha: float = 1.0) -> torch.Tensor:
    """Add-alpha smoothed unigram log-probabilities [V] of the training tokens (the floor any LM must beat)."""
    counts = unigram_counts(blocks, vocab_size).double() + alpha
    return (counts / counts.sum()).log().float()


@torch.inference_mode()
def evaluate_fidelity(
    student: torch.nn.Module,
    teacher: Any,
    batches: list[tuple[torch.Tensor, torch.Tensor]],
    device: torch.device | str = "cpu",
    unigram_logprobs: torch.Tensor | None = None,
) -> dict[str, float]:
    """Student vs teacher over held-out batches of (input_ids [B, S], attention_mask [B, S]).

    Perplexities are next-token perplexities on the same tokens; KL(teacher || student) and top-1
    agreement are averaged over every real position (temperature 1).
    """
    was_training = student.training
    student.eval()
    n_pos = n_next = 0
    kl_sum = agree = s_nll = t_nll = u_nll = 0.0
    for ids, mask in batches:
        ids, mask = ids.to(device), mask.to(device)
        s_logp = F.log_softmax(student(ids).float(), dim=-1)
        t_logp = F.log_softmax(teacher.logits(ids, mask).float().to(device), dim=-1)
        real = mask.bool()
        kl = (t_logp.exp() * (t_logp - s_logp)).sum(-1)
        kl_sum += float(kl[real].sum())
        agree += float((s_logp.argmax(-1) == t_logp.argmax(-1))[real].sum())
        n_pos += int(real.sum())
        nxt = real[:, 1:] & real[:, :-1]
        tgt = ids[:, 1:]
        s_nll -= float(s_logp[:, :-1].gather(-1, tgt[..., None]).squeeze(-1)[nxt].sum())
        t_nll -= float(t_logp[:, :-1].gather(-1, tgt[..., None]).squeeze(-1)[nxt].sum())
        if unigram_logprobs is not None:
            u_nll -= float(unigram_logprobs.to(device)[tgt][nxt].sum())
        n_next += int(nxt.sum())
    student.train(was_training)
    if n_pos == 0 or n_next == 0:
        return {}
    res = {
        "student_perplexity": math.exp(s_nll / n_next),
        "teacher_perplexity": math.exp(t_nll / n_next),
        "kl_teacher_student": kl_sum / n_pos,
        "top1_agreement": agree / n_pos,
        "tokens": n_pos,
    }
    if unigram_logprobs is not None:
        res["unigram_perplexity"] = math.exp(u_nll / n_next)
    return res
