"""Is the student any good, and what do its spikes save? Fidelity and efficiency figures.

Fidelity (`evaluate_fidelity`), on the same tokens for everyone:

- student / teacher perplexity: exp of the mean next-token negative log-likelihood;
- KL(teacher || student) and top-1 agreement, averaged over every real position (temperature 1);
- unigram perplexity (`unigram_baseline`): add-one-smoothed token frequencies of the training data,
  the floor that any language model has to beat.

Efficiency (`evaluate_efficiency`), measured on evaluation data with `model.set_record_stats(True)`:

- per LIF layer: spike rate (mean over tokens, timesteps and neurons) and the share of neurons that
  never fired during the whole evaluation ("dead");
- operations per token, split into accumulates (AC: adding a weight because an input spiked) and
  multiply-accumulates (MAC: real-valued input times weight), for the spiking model and for the
  same-shape non-spiking model (the ANN twin: one timestep, no spikes);
- an energy estimate per token from 45 nm figures: 0.9 pJ per 32-bit float AC and 4.6 pJ per 32-bit
  float MAC (M. Horowitz, "Computing's energy problem", ISSCC 2014). It counts arithmetic only and
  ignores memory traffic (weight and activation reads usually dominate on real hardware), so it is
  an estimate of the arithmetic, not of a chip.

Operation accounting, per token, for one block (D = dim, F = MLP hidden, H / Hkv heads, hd = head
size, Q = (H + 2 Hkv) hd, T = timesteps, c = mean number of attended positions, i.e. the mean over
evaluated tokens of (position + 1); r_q, r_k, r_v, r_mlp = measured spike rates):

    layer                      input            spiking model (T steps)           ANN twin
    qkv projection             real (RMSNorm)   MAC  T * D * Q                    MAC  D * Q
    LIF membrane updates       -                MAC  T * (Q + F)                  -
    scores q . k (RoPE)        binary Q, K      AC   T * H * c * 2 hd * r_q * r_k  MAC  H * c * hd
    softmax                    real             MAC  T * H * c                    MAC  H * c
    weights . V                binary V         AC   T * H * c * hd * r_v          MAC  H * c * hd
    output projection (proj)   real (softmax)   MAC  T * H * hd * D               MAC  H * hd * D
    up projection              real (RMSNorm)   MAC  T * D * F                    MAC  D * F
    down projection            spikes           AC   (MLP spikes per token) * D   MAC  F * D
    LM head (once per token)   real (T-mean)    MAC  D * V                        MAC  D * V

- `mlp.down` is the one weight layer fed by spikes: its synaptic operations are exactly the MLP's
  input spikes per token (summed over the T timesteps) times its fan-out D. `attn.proj` reads a
  softmax-weighted sum of V spikes, which is real-valued, so it counts as MACs, as do qkv, up and
  the LM head; the spiking model pays them T times (once per timestep), the ANN once.
- Scores: RoPE rotates each 2-d pair of the binary Q and K vectors, so q_rot . k_rot is a sum over
  pairs of spikes (q_i, k_j) in the same 2-d pair of fixed coefficients (cos/sin of the relative
  position): one accumulate per coinciding spike pair, 2 hd r_q r_k per (query, key, head) on average,
  assuming Q and K spikes independent. Weights . V adds the attention weight p_ij once per V spike.
  The softmax is real arithmetic (one MAC-class operation per score) in both models.
- The LIF update u = decay * u + I - theta * s is counted as one MAC per neuron and timestep.
  Norms, residual adds, RoPE tables, the T-average readout, GELU and the embedding lookup are left
  out of both models (small next to the matrix products, and the same kind of work in both).
- Rates are averaged over neurons; figures are per evaluated token at the evaluation's context
  length c, which is reported next to them (attention cost grows with it).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from .data import unigram_counts

AC_PJ = 0.9  # 32-bit float add, 45 nm (Horowitz, ISSCC 2014)
MAC_PJ = 4.6  # 32-bit float multiply (3.7 pJ) + add (0.9 pJ), 45 nm (Horowitz, ISSCC 2014)
ENERGY_NOTE = (
    "estimate from 45 nm arithmetic energies (0.9 pJ per accumulate, 4.6 pJ per multiply-accumulate; "
    "Horowitz, ISSCC 2014); counts arithmetic only and ignores memory traffic, which usually dominates"
)

Batch = tuple[torch.Tensor, torch.Tensor]


def unigram_baseline(blocks: list[list[int]], vocab_size: int, alpha: float = 1.0) -> torch.Tensor:
    """Add-alpha smoothed unigram log-probabilities [V] of the training tokens (the floor any LM must beat)."""
    counts = unigram_counts(blocks, vocab_size).double() + alpha
    return (counts / counts.sum()).log().float()


def _teacher_logits(teacher: Any, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """A `Teacher` (its `.logits(ids, mask)`) or any callable (ids, mask) -> logits [B, S, V]."""
    fn = getattr(teacher, "logits", None)
    return fn(ids, mask) if callable(fn) else teacher(ids, mask)


@torch.inference_mode()
def evaluate_fidelity(
    student: torch.nn.Module | Callable[[torch.Tensor], torch.Tensor],
    teacher: Any,
    batches: list[Batch],
    device: torch.device | str = "cpu",
    unigram_logprobs: torch.Tensor | None = None,
) -> dict[str, float]:
    """Student vs teacher over held-out batches of (input_ids [B, S], attention_mask [B, S]).

    `student`: a model or any callable ids [B, S] -> logits [B, S, V]; `teacher`: a `Teacher` or any
    callable (ids, mask) -> logits [B, S, V]. Perplexities are next-token perplexities on the same
    tokens; KL(teacher || student) and top-1 agreement are averaged over every real position
    (temperature 1). Returns {} when the batches hold no predictable token.
    """
    is_module = isinstance(student, torch.nn.Module)
    was_training = student.training if is_module else False
    if is_module:
        student.eval()
    n_pos = n_next = 0
    kl_sum = agree = s_nll = t_nll = u_nll = 0.0
    try:
        for ids, mask in batches:
            ids, mask = ids.to(device), mask.to(device)
            s_logp = F.log_softmax(student(ids).float(), dim=-1)
            t_logp = F.log_softmax(_teacher_logits(teacher, ids, mask).float().to(device), dim=-1)
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
    finally:
        if is_module:
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


# ---------------------------------------------------------------------------------------------
# Efficiency
# ---------------------------------------------------------------------------------------------


def _unpadded(batches: Sequence[Batch]) -> list[torch.Tensor]:
    """Right-padded batches -> id tensors without padding: rows grouped by their real length.

    The student is causal, so a row's prefix gives the same spikes alone as inside the padded row,
    and LIF `fire_counts` then count real tokens only.
    """
    out = []
    for ids, mask in batches:
        lengths = mask.sum(1).tolist()
        for n in sorted(set(lengths)):
            if n > 0:
                rows = [i for i, m in enumerate(lengths) if m == n]
                out.append(ids[rows, : int(n)])
    return out


@torch.inference_mode()
def measure_spikes(model: torch.nn.Module, batches: Sequence[Batch], device: torch.device | str = "cpu") -> dict:
    """Run the model over the real tokens of `batches` with spike recording on.

    Leaves the totals in each LIF's `fire_counts` / `num_observations`; returns
    {"tokens": real tokens, "mean_context": mean over tokens of (position + 1)}.
    """
    was_training = model.training
    model.eval()
    tokens = 0
    ctx = 0.0
    model.set_record_stats(True)
    try:
        for ids in _unpadded(batches):
            model(ids.to(device))
            b, s = ids.shape
            tokens += b * s
            ctx += b * s * (s + 1) / 2
    finally:
        for m in model.lif_modules():
            m.record_stats = False  # keep the counts; stop adding to them
        model.train(was_training)
    return {"tokens": tokens, "mean_context": ctx / tokens if tokens else 0.0}


def spike_statistics(model: torch.nn.Module) -> dict[str, dict[str, Any]]:
    """Per LIF layer, from its recorded counts: rate, dead share, spikes per token and, for Q/K/V
    layers, the rate of each of the three parts."""
    cfg = model.config
    t = model.timesteps
    stats: dict[str, dict[str, Any]] = {}
    for m in model.lif_modules():
        if m.fire_counts is None or m.num_observations == 0:
            continue
        counts = m.fire_counts.detach().double().cpu()
        neurons = counts.numel()
        obs = m.num_observations  # timesteps x tokens
        entry: dict[str, Any] = {
            "spike_rate": float(counts.sum()) / (obs * neurons),
            "dead_fraction": float((counts == 0).double().mean()),
            "dead_neurons": int((counts == 0).sum()),
            "neurons": neurons,
            "spikes_per_token": float(counts.sum()) * t / obs,
        }
        if m.stat_name.endswith(".qkv"):
            q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
            for part, sl in (("q", slice(0, q)), ("k", slice(q, q + kv)), ("v", slice(q + kv, q + 2 * kv))):
                entry[f"rate_{part}"] = float(counts[sl].sum()) / (obs * counts[sl].numel())
        stats[m.stat_name] = entry
    return stats


def operation_counts(cfg: Any, layers: dict[str, dict[str, Any]], mean_context: float) -> dict[str, Any]:
    """Operations per token of the spiking model (given measured `layers` from `spike_statistics`)
    and of its same-shape ANN twin; see the module docstring for every term."""
    d, f, h, hkv, hd, v = cfg.dim, cfg.hidden_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.vocab_size
    q_out = (h + 2 * hkv) * hd
    c = float(mean_context)
    t = cfg.num_timesteps
    snn = {"qkv": 0.0, "lif_updates": 0.0, "softmax": 0.0, "proj": 0.0, "up": 0.0, "lm_head": float(d * v)}
    snn_ac = {"scores": 0.0, "attn_values": 0.0, "down": 0.0}
    ann = {
        "qkv": float(cfg.depth * d * q_out),
        "scores": float(cfg.depth * h * c * hd),
        "softmax": float(cfg.depth * h * c),
        "attn_values": float(cfg.depth * h * c * hd),
        "proj": float(cfg.depth * h * hd * d),
        "up": float(cfg.depth * d * f),
        "down": float(cfg.depth * f * d),
        "lm_head": float(d * v),
    }
    for i in range(cfg.depth):
        attn = layers.get(f"blocks.{i}.attn.qkv", {})
        mlp = layers.get(f"blocks.{i}.mlp.up", {})
        snn["qkv"] += t * d * q_out
        snn["lif_updates"] += t * (q_out + f)
        snn["softmax"] += t * h * c
        snn["proj"] += t * h * hd * d
        snn["up"] += t * d * f
        snn_ac["scores"] += t * h * c * 2 * hd * attn.get("rate_q", 0.0) * attn.get("rate_k", 0.0)
        snn_ac["attn_values"] += t * h * c * hd * attn.get("rate_v", 0.0)
        snn_ac["down"] += mlp.get("spikes_per_token", 0.0) * d
    snn_mac_total = sum(snn.values())
    snn_ac_total = sum(snn_ac.values())
    ann_total = sum(ann.values())
    snn_energy = snn_ac_total * AC_PJ + snn_mac_total * MAC_PJ
    ann_energy = ann_total * MAC_PJ
    body = {
        "snn_energy_nj": (snn_energy - snn["lm_head"] * MAC_PJ) / 1e3,
        "ann_energy_nj": (ann_energy - ann["lm_head"] * MAC_PJ) / 1e3,
    }
    return {
        "snn_synops_per_token": snn_ac_total,
        "snn_macs_per_token": snn_mac_total,
        "ann_macs_per_token": ann_total,
        "snn_energy_nj_per_token": snn_energy / 1e3,
        "ann_energy_nj_per_token": ann_energy / 1e3,
        "energy_ratio_snn_to_ann": snn_energy / ann_energy if ann_energy else None,
        "without_lm_head": {
            **body,
            "energy_ratio_snn_to_ann": body["snn_energy_nj"] / body["ann_energy_nj"] if body["ann_energy_nj"] else None,
        },
        "breakdown_per_token": {"snn_ac": snn_ac, "snn_mac": snn, "ann_mac": ann},
    }


def efficiency_report(
    model: torch.nn.Module, tokens: int, mean_context: float, split: str | None = None
) -> dict[str, Any]:
    """The `efficiency` metadata section from the counts recorded in the model's LIF layers."""
    cfg = model.config
    layers = spike_statistics(model) if cfg.spiking else {}
    rep: dict[str, Any] = {}
    if split is not None:
        rep["split"] = split
    rep.update(
        student_type=cfg.student_type,
        tokens=int(tokens),
        timesteps=model.timesteps,
        mean_context=mean_context,
    )
    if cfg.spiking:
        neurons = sum(e["neurons"] for e in layers.values())
        obs_rates = [e["spike_rate"] * e["neurons"] for e in layers.values()]
        rep["mean_spike_rate"] = sum(obs_rates) / neurons if neurons else None
        rep["dead_fraction"] = sum(e["dead_neurons"] for e in layers.values()) / neurons if neurons else None
    else:
        rep["mean_spike_rate"] = rep["dead_fraction"] = None
    rep["layers"] = layers
    ops = operation_counts(cfg, layers, mean_context)
    if not cfg.spiking:  # the model is the ANN twin: only its own figures apply
        ops = {k: v for k, v in ops.items() if k.startswith("ann_")} | {
            "without_lm_head": {"ann_energy_nj": ops["without_lm_head"]["ann_energy_nj"]},
            "breakdown_per_token": {"ann_mac": ops["breakdown_per_token"]["ann_mac"]},
        }
    rep.update(ops)
    rep["energy_pj_per_op"] = {"ac": AC_PJ, "mac": MAC_PJ}
    rep["note"] = ENERGY_NOTE
    return rep


def evaluate_efficiency(
    model: torch.nn.Module,
    batches: Sequence[Batch],
    device: torch.device | str = "cpu",
    split: str | None = None,
) -> dict[str, Any]:
    """Spike rates, dead neurons, operations and energy per token over the real tokens of `batches`."""
    if model.config.spiking:
        measured = measure_spikes(model, batches, device)
    else:
        masks = [m for _, m in batches]
        tokens = sum(int(m.sum()) for m in masks)
        ctx = sum(float(((m.cumsum(1)) * m).sum()) for m in masks)
        measured = {"tokens": tokens, "mean_context": ctx / tokens if tokens else 0.0}
    try:
        return efficiency_report(model, measured["tokens"], measured["mean_context"], split)
    finally:
        if model.config.spiking:
            model.set_record_stats(False)


# ---------------------------------------------------------------------------------------------
# Printing
# ---------------------------------------------------------------------------------------------


def _si(x: float | None) -> str:
    if x is None:
        return "-"
    for div, unit in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= div:
            return f"{x / div:.2f}{unit}"
    return f"{x:.1f}"


def format_report(evaluation: dict[str, Any] | None, efficiency: dict[str, Any] | None) -> str:
    """A small plain-text table of the `evaluation` and `efficiency` sections."""
    lines: list[str] = []
    ev = evaluation or {}
    if "student_perplexity" in ev:
        split = ev.get("split", "held_out")
        lines.append(f"fidelity on {ev.get('tokens', 0)} tokens ({split} split)")
        lines.append(f"  {'perplexity':<24}{'student':>10}{'teacher':>10}{'unigram':>10}")
        uni = ev.get("unigram_perplexity")
        lines.append(
            f"  {'':<24}{ev['student_perplexity']:>10.2f}{ev['teacher_perplexity']:>10.2f}"
            f"{(f'{uni:.2f}' if uni is not None else '-'):>10}"
        )
        lines.append(f"  {'KL(teacher||student)':<24}{ev['kl_teacher_student']:>10.4f}")
        lines.append(f"  {'top-1 agreement':<24}{ev['top1_agreement']:>10.3f}")
    elif evaluation is not None:
        lines.append("fidelity: no evaluation tokens")
    eff = efficiency or {}
    if eff:
        if eff.get("layers"):
            lines.append(f"spikes (mean over tokens and timesteps, T={eff.get('timesteps')})")
            lines.append(f"  {'layer':<24}{'rate':>10}{'dead':>10}")
            for name, e in eff["layers"].items():
                lines.append(f"  {name:<24}{e['spike_rate']:>10.3f}{e['dead_fraction'] * 100:>9.1f}%")
            lines.append(f"  {'all layers':<24}{eff['mean_spike_rate']:>10.3f}{eff['dead_fraction'] * 100:>9.1f}%")
        lines.append(f"per token (context {eff.get('mean_context', 0):.1f})  {'SNN':>10}{'ANN twin':>10}")
        lines.append(f"  {'synaptic ops (AC)':<24}{_si(eff.get('snn_synops_per_token')):>10}{'-':>10}")
        lines.append(
            f"  {'multiply-accumulates':<24}{_si(eff.get('snn_macs_per_token')):>10}"
            f"{_si(eff.get('ann_macs_per_token')):>10}"
        )
        s_e, a_e = eff.get("snn_energy_nj_per_token"), eff.get("ann_energy_nj_per_token")
        lines.append(
            f"  {'energy, nJ (estimate)':<24}{(f'{s_e:.1f}' if s_e is not None else '-'):>10}"
            f"{(f'{a_e:.1f}' if a_e is not None else '-'):>10}"
        )
        body = eff.get("without_lm_head") or {}
        if body:
            s_b, a_b = body.get("snn_energy_nj"), body.get("ann_energy_nj")
            lines.append(
                f"  {'  without the LM head':<24}{(f'{s_b:.1f}' if s_b is not None else '-'):>10}"
                f"{(f'{a_b:.1f}' if a_b is not None else '-'):>10}"
            )
        lines.append(f"  note: {eff.get('note', ENERGY_NOTE)}")
    return "\n".join(lines)
