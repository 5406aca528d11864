"""Distillation losses, computed in chunks of tokens straight from the student's hidden states.

A step over N tokens with a V-word vocabulary would normally hold several [N, V] tensors for the
backward pass (logits, log-softmax, probabilities, their gradients). `chunked_distill_loss` instead
projects a chunk of tokens to logits, computes the loss and its gradient w.r.t. those logits at once,
and immediately folds that gradient back into d(hidden) and d(lm_head weight) (the idea of fused
linear-cross-entropy kernels); only one [chunk, V] block lives at a time, and the autograd backward
just scales the stored gradients. For the default forward KL the per-chunk kernel (both log-softmaxes,
the KL and its gradient) is `torch.compile`d, or Liger Kernel's on CUDA (`fused_loss.py`, --fused-loss).

Targets from the teacher are either full log-probabilities [N, V] (a live teacher), or the top-k
log-probabilities with indices [N, k] from the logit cache. With top-k targets the teacher keeps the
remaining probability mass r_t = 1 - sum(top-k) as one "tail" bin, and the student's tail is
r_s = 1 - sum of its own probabilities on those k words: the KL is taken between these (k+1)-bin
distributions. That is exact for the coarse-grained distributions and never exceeds the full KL
(data-processing inequality), so it under-counts disagreement inside the tail; its gradient equals
forward KL against a teacher whose tail mass is spread like the student's own tail. Plain top-k
truncation (renormalising the k words and dropping the tail) would instead overstate the teacher's
confidence in the top words, worst where the teacher is uncertain.

Every loss is multiplied by T^2 (Hinton et al.) so gradient magnitudes do not shrink with the
temperature, and weighted per token, so that the caller can normalise by the number of real tokens
of a whole accumulated batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .fused_loss import COMPILED, CompiledKL, liger_forward_kl, resolve_fused_loss
from .fused_loss import log1mexp as _log1mexp

KD_KINDS = ("forward_kl", "reverse_kl", "jsd")


@dataclass
class TeacherTargets:
    """Teacher's side of the loss for N tokens.

    Full: `logprobs` [N, V] = log_softmax(teacher_logits / T), `indices` None.
    Top-k: `logprobs` [N, k] and `indices` [N, k] (int64); `tail` [N] is the log of the remaining mass
    (computed from the full distribution, as the logit cache stores it), or None: then it is taken as
    log(1 - sum(exp(logprobs))).
    Raw (`raw` True, full only): `logprobs` [N, V] holds the teacher's logits (any float dtype, no
    temperature applied); the loss takes their log-softmax at T chunk by chunk, which saves an [N, V]
    pass and an fp32 [N, V] buffer.
    """

    logprobs: torch.Tensor
    indices: torch.Tensor | None = None
    tail: torch.Tensor | None = None
    raw: bool = False

    def __post_init__(self) -> None:
        assert not (self.raw and self.indices is not None), "raw teacher logits are full targets"

    def __getitem__(self, sl: slice) -> TeacherTargets:
        return TeacherTargets(
            self.logprobs[sl],
            None if self.indices is None else self.indices[sl],
            None if self.tail is None else self.tail[sl],
            self.raw,
        )

    def resolved(self, temperature: float, dtype: torch.dtype = torch.float32) -> TeacherTargets:
        """These targets as log-probabilities (raw logits: log_softmax(logits / T) in `dtype`)."""
        if not self.raw:
            return self
        return TeacherTargets(torch.log_softmax(self.logprobs.to(dtype) / temperature, dim=-1))

    def to(self, device: torch.device | str, non_blocking: bool = False) -> TeacherTargets:
        """On `device`; non_blocking copies overlap with compute when the tensors are in pinned memory."""
        idx = None if self.indices is None else self.indices.to(device, non_blocking=non_blocking)
        tail = None if self.tail is None else self.tail.to(device, non_blocking=non_blocking)
        return TeacherTargets(self.logprobs.to(device, non_blocking=non_blocking), idx, tail, self.raw)


def token_weights(
    n: int, scale: float, keep: torch.Tensor | None = None, device: torch.device | str | None = None
) -> torch.Tensor:
    """Per-token loss weights [n]: `scale` on every token, or only where `keep` [n] (bool) is True and
    0 elsewhere. The response-only loss keeps the positions that predict a reply token, with `scale`
    = 1 / (number of such positions in the whole step)."""
    if keep is None:
        return torch.full((n,), scale, device=device)
    return keep.to(device=device, dtype=torch.float32) * scale


def _binned(student_logp: torch.Tensor, targets: TeacherTargets) -> tuple[torch.Tensor, torch.Tensor]:
    """Student and teacher log-probs over the bins the teacher describes: [n, V] or [n, k+1]."""
    if targets.indices is None:
        return student_logp, targets.logprobs.to(student_logp.dtype)
    s_top = student_logp.gather(1, targets.indices)
    t_top = targets.logprobs.to(student_logp.dtype)
    s_tail = _log1mexp(torch.logsumexp(s_top, dim=1, keepdim=True))
    if targets.tail is not None:
        t_tail = targets.tail.to(student_logp.dtype)[:, None]
    else:
        t_tail = _log1mexp(torch.logsumexp(t_top, dim=1, keepdim=True))
    return torch.cat([s_top, s_tail], 1), torch.cat([t_top, t_tail], 1)


def kd_per_token(student_logits: torch.Tensor, targets: TeacherTargets, kind: str, temperature: float) -> torch.Tensor:
    """Reference distillation loss per token (differentiable, T^2-scaled). logits [n, V] -> [n]."""
    logits = student_logits.to(torch.promote_types(student_logits.dtype, torch.float32))
    targets = targets.resolved(temperature, logits.dtype)
    s_logp, t_logp = _binned(F.log_softmax(logits / temperature, dim=-1), targets)
    if kind == "forward_kl":
        loss = (t_logp.exp() * (t_logp - s_logp)).sum(-1)
    elif kind == "reverse_kl":
        loss = (s_logp.exp() * (s_logp - t_logp)).sum(-1)
    elif kind == "jsd":
        m_logp = torch.logaddexp(s_logp, t_logp) - torch.log(torch.tensor(2.0, device=s_logp.device))
        loss = 0.5 * (t_logp.exp() * (t_logp - m_logp)).sum(-1) + 0.5 * (s_logp.exp() * (s_logp - m_logp)).sum(-1)
    else:
        raise ValueError(f"unknown kd loss {kind!r}; choose one of {', '.join(KD_KINDS)}")
    return loss * temperature**2


def _rowdot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise dot product [n, V] x [n, V] -> [n] without an [n, V] temporary."""
    return torch.linalg.vecdot(a, b)


def _forward_kl_lean(
    z: torch.Tensor,
    targets: TeacherTargets,
    temperature: float,
    p_out: torch.Tensor | None = None,
    t_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward KL without hard labels (the default): (kd per token, T^2-scaled, [n]; G [n, V]) for
    logits z [n, V], where d(T^2 KL)/dz = T * G; the caller folds T and the token weights into the
    [n, D]-sized matmul operands instead of another [n, V] pass. Overwrites z.

    Seven [n, V] passes and two [n, V] buffers (besides z), where the plain formulation makes about
    fifteen passes and eight buffers:
      lse = max(z) - log(max(softmax(z)))             (two cheap max reductions, no logsumexp buffer)
      full targets:  KL = lse - sum p_t (z - log p_t),     G = p_s - p_t
      top-k + tail:  (k+1)-bin KL on [n, k] gathers,       G = p_s * (1 - r) off the top k,
                     p_s - p_t on it, with r = tail_t / tail_s (the teacher's tail spread like the
                     student's own tail).
    `p_out` / `t_out` ([n, V]) receive p_s (then G) and p_t when given: the caller reuses them over
    chunks, since fresh pages for large tensors cost more than the arithmetic on them on CPU.
    """
    if temperature != 1.0:
        z.div_(temperature)
    zmax = z.amax(dim=1)
    p_s = torch.softmax(z, dim=-1) if p_out is None else torch.softmax(z, dim=-1, out=p_out)
    lse = zmax - p_s.amax(dim=1).log()  # p_s max = exp(zmax - lse), >= 1/V: well conditioned
    if targets.indices is None:
        t_logp = targets.logprobs.to(z.dtype)
        p_t = t_logp.exp() if t_out is None else torch.exp(t_logp, out=t_out)
        z.sub_(t_logp)
        kd = lse - _rowdot(p_t, z)
        del z
        grad = p_s.sub_(p_t)
    else:
        idx = targets.indices
        s_top = z.gather(1, idx) - lse[:, None]
        del z
        t_top = targets.logprobs.to(s_top.dtype)
        s_tail = _log1mexp(torch.logsumexp(s_top, dim=1))
        if targets.tail is not None:
            t_tail = targets.tail.to(s_top.dtype)
        else:
            t_tail = _log1mexp(torch.logsumexp(t_top, dim=1))
        p_top = t_top.exp()
        kd = (p_top * (t_top - s_top)).sum(-1) + t_tail.exp() * (t_tail - s_tail)
        ratio = (t_tail - s_tail).exp()
        grad = p_s.mul_((1.0 - ratio)[:, None])
        grad.scatter_(1, idx, s_top.exp() - p_top)
    return kd * temperature**2, grad


def _lean_kernel(
    z: torch.Tensor,
    targets: TeacherTargets,
    temperature: float,
    fused: str,
    p_out: torch.Tensor | None,
    t_out: torch.Tensor | None,
    compiled: CompiledKL = COMPILED,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`_forward_kl_lean`'s result for logits z [n, V] (may be overwritten): from the compiled kernel when
    `fused` is "compile" and it compiles, else from the eager one."""
    if fused == "compile":
        out = compiled.run(z, targets, temperature)
        if out is not None:
            return out[0] * temperature**2, out[1]
    return _forward_kl_lean(z, targets.resolved(temperature, z.dtype), temperature, p_out=p_out, t_out=t_out)


def _chunk_loss_and_grad(
    z: torch.Tensor,
    targets: TeacherTargets,
    labels: torch.Tensor | None,
    tok_w: torch.Tensor,
    ce_w: torch.Tensor | None,
    kind: str,
    temperature: float,
    hard_weight: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(total, kd_sum, ce_sum, d(total)/dz) for one chunk of logits z [n, V] (fp32, or fp64 in tests).

    Forward KL (the default) and cross-entropy have closed-form gradients (softmax minus target),
    which saves the autograd bookkeeping on the hot path; the other divergences use local autograd.
    """
    kd_scale = 1.0 - hard_weight
    if kind == "forward_kl":
        s_logp = F.log_softmax(z / temperature, dim=-1)
        p_s = s_logp.exp()
        if targets.indices is None:
            t_logp = targets.logprobs.to(z.dtype)
            p_t = t_logp.exp()
            kd = (p_t * (t_logp - s_logp)).sum(-1)
            q = p_t
        else:
            s_b, t_b = _binned(s_logp, targets)
            kd = (t_b.exp() * (t_b - s_b)).sum(-1)
            # Gradient target: teacher's top-k probabilities, its tail mass spread like the student's tail.
            ratio = (t_b[:, -1] - s_b[:, -1]).exp()
            q = p_s * ratio[:, None]
            q.scatter_(1, targets.indices, targets.logprobs.to(z.dtype).exp())
        kd = kd * temperature**2
        grad = (p_s - q) * (temperature * kd_scale * tok_w)[:, None]
    else:
        with torch.enable_grad():
            zz = z.detach().requires_grad_()
            kd = kd_per_token(zz, targets, kind, temperature)
            (grad,) = torch.autograd.grad((kd * tok_w).sum() * kd_scale, zz)
        kd = kd.detach()
    kd_sum = (kd * tok_w).sum()
    ce_sum = z.new_zeros(())
    if hard_weight > 0 and labels is not None:
        logp = F.log_softmax(z, dim=-1)
        valid = labels >= 0
        safe = labels.clamp_min(0)
        ce = -logp.gather(1, safe[:, None]).squeeze(1) * valid
        ce_sum = (ce * ce_w).sum()
        g = logp.exp()
        g[torch.arange(z.shape[0], device=z.device), safe] -= valid.to(g.dtype)
        grad += g * (hard_weight * ce_w * valid)[:, None]
    total = kd_scale * kd_sum + hard_weight * ce_sum
    return total, kd_sum, ce_sum, grad


class _ChunkedDistill(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        hidden,
        weight,
        t_logprobs,
        t_indices,
        t_tail,
        labels,
        tok_w,
        ce_w,
        kind,
        temperature,
        hard_weight,
        chunk,
        t_raw,
        fused,
    ):
        targets = TeacherTargets(t_logprobs, t_indices, t_tail, t_raw)
        n = hidden.shape[0]
        grad_h = torch.empty_like(hidden) if hidden.requires_grad else None
        # Accumulate in fp32 at least (bf16 activations on GPU), in fp64 when given fp64.
        acc = torch.promote_types(hidden.dtype, torch.float32)
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if weight.requires_grad else None
        total = hidden.new_zeros((), dtype=acc)
        kd_total = total.clone()
        ce_total = total.clone()
        w32 = weight.to(acc)
        lean = kind == "forward_kl" and hard_weight == 0  # the default: closed form, fewest [c, V] passes
        pbuf = tbuf = None  # the compiled kernel allocates G; an eager fallback allocates its own
        if lean and n > 0:  # [c, V] work buffers, reused by every chunk
            shape = (min(chunk, n), weight.shape[0])
            zbuf = torch.empty(shape, dtype=acc, device=hidden.device)
            if fused != "compile":
                pbuf = torch.empty(shape, dtype=acc, device=hidden.device)
                tbuf = torch.empty(shape, dtype=acc, device=hidden.device) if t_indices is None else None
        for i in range(0, n, chunk):
            sl = slice(i, min(i + chunk, n))
            h = hidden[sl].to(acc)
            tw = tok_w[sl].to(acc)
            c = h.shape[0]
            if lean:
                z = torch.mm(h, w32.t(), out=zbuf[:c])  # [c, V]
                # d(loss)/dz = G * (T * tok_w) per row: the row scale goes onto the [c, D] operands
                pb = None if pbuf is None else pbuf[:c]
                tb = None if tbuf is None else tbuf[:c]
                kd_tok, g = _lean_kernel(z, targets[sl], temperature, fused, pb, tb)
                del z
                kd = (kd_tok * tw).sum()
                t, ce = kd, kd.new_zeros(())
                row = temperature * tw
                g_h = h * row[:, None]
            else:
                z = F.linear(h, w32)  # [c, V]; F.linear: hooks and profilers see the head matmul
                lab = None if labels is None else labels[sl]
                cw = None if ce_w is None else ce_w[sl]
                tgt = targets[sl].resolved(temperature, acc)
                t, kd, ce, g = _chunk_loss_and_grad(z, tgt, lab, tw, cw, kind, temperature, hard_weight)
                del z
                row, g_h = None, h
            total += t
            kd_total += kd
            ce_total += ce
            if grad_h is not None:
                gh = g @ w32
                if row is not None:
                    gh.mul_(row[:, None])
                grad_h[sl] = gh.to(hidden.dtype)
            if grad_w is not None:
                grad_w.addmm_(g.t(), g_h)
            del g
        ctx.save_for_backward(grad_h, grad_w.to(weight.dtype) if grad_w is not None else None)
        ctx.mark_non_differentiable(kd_total, ce_total)
        return total, kd_total, ce_total

    @staticmethod
    def backward(ctx, g_total, _g_kd, _g_ce):
        grad_h, grad_w = ctx.saved_tensors
        gh = None if grad_h is None else grad_h * g_total
        gw = None if grad_w is None else grad_w * g_total
        return gh, gw, *([None] * 13)


def chunked_distill_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: TeacherTargets,
    tok_w: torch.Tensor,
    *,
    kind: str = "forward_kl",
    temperature: float = 1.0,
    labels: torch.Tensor | None = None,
    ce_w: torch.Tensor | None = None,
    hard_weight: float = 0.0,
    chunk: int = 1024,
    fused: str = "eager",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Weighted distillation loss over N tokens without materialising [N, V] for the backward.

    hidden [N, D] (requires grad), weight [V, D] (LM head), targets for the same N tokens,
    tok_w [N] per-token weights for the KD term (e.g. 1 / total real tokens of the step),
    labels [N] next-token ids (-1 where none) with ce_w [N] weights for the hard-label term.
    Returns (loss, kd_sum, ce_sum): loss = (1 - hard_weight) * kd_sum + hard_weight * ce_sum,
    where kd_sum and ce_sum are the weighted sums (for logging).
    `fused` picks the forward-KL chunk kernel (`fused_loss.FUSED_LOSS_MODES`; training passes
    --fused-loss, default auto); the other losses and hard labels always run the eager chunk code.
    """
    if kind not in KD_KINDS:
        raise ValueError(f"unknown kd loss {kind!r}; choose one of {', '.join(KD_KINDS)}")
    if hard_weight > 0 and (labels is None or ce_w is None):
        raise ValueError("hard_weight > 0 needs labels and ce_w")
    mode = resolve_fused_loss(fused, hidden.device)
    if mode == "liger":
        if kind == "forward_kl" and hard_weight == 0 and targets.indices is None:
            loss = liger_forward_kl(hidden.float(), weight.float(), targets, tok_w, temperature)
            kd = loss.detach()
            return loss, kd, kd.new_zeros(())
        mode = "compile"  # top-k targets, other losses: the compiled kernel (or the eager code)
    return _ChunkedDistill.apply(
        hidden,
        weight,
        targets.logprobs,
        targets.indices,
        targets.tail,
        labels,
        tok_w,
        ce_w,
        kind,
        float(temperature),
        float(hard_weight),
        int(chunk),
        targets.raw,
        mode,
    )


def reference_distill_loss(
    logits: torch.Tensor,
    targets: TeacherTargets,
    tok_w: torch.Tensor,
    *,
    kind: str = "forward_kl",
    temperature: float = 1.0,
    labels: torch.Tensor | None = None,
    ce_w: torch.Tensor | None = None,
    hard_weight: float = 0.0,
) -> torch.Tensor:
    """The same loss written plainly over full logits [N, V] (tests and small-vocabulary checks)."""
    loss = (1 - hard_weight) * (kd_per_token(logits, targets, kind, temperature) * tok_w).sum()
    if hard_weight > 0:
        valid = labels >= 0
        ce = (
            F.cross_entropy(
                logits.to(torch.promote_types(logits.dtype, torch.float32)),
                labels.clamp_min(0),
                reduction="none",
            )
            * valid
        )
        loss = loss + hard_weight * (ce * ce_w).sum()
    return loss
