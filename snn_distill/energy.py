"""Operations and energy per token, per weight matmul and by operand.

Every weight matmul of the student goes through `F.linear`; `MatmulCounter` watches each call during
an evaluation forward and looks at the operand it really received:

- a spike code (every value an integer in -T..T: binary or ternary spikes per timestep, or per-token
  spike counts) costs one accumulate (AC) per spike and output: `sum(|input|) * fan_out`;
- anything else costs a multiply-accumulate (MAC) per input value and output: `numel(input) * fan_out`.

The ANN twin (same weights, one timestep, no spikes) applies each weight matmul once per token:
`fan_in * fan_out` MACs. Attention and neuron updates are counted from the measured spike rates,
per token, for one block (H heads, hd head size, c = mean attended positions, T timesteps):

    term                     spiking student                      ANN twin
    scores q . k (RoPE)      AC   T * H * c * 2 hd * r_q * r_k     MAC  H * c * hd
    softmax                  MAC  T * H * c                        MAC  H * c
    weights . V              AC   T * H * c * hd * r_v             MAC  H * c * hd
    LIF membrane updates     MAC  T * neurons                      -

A count-coded student (`coding = "count"`, see counting.py) reads count vectors in 0..T: a score
q . k counts the coinciding spike pairs (t, t') of the two expanded trains, T^2 * 2 hd * r_q * r_k
accumulates per score instead of T * 2 hd * r_q * r_k, and its softmax runs once per token, not T times.

RoPE rotates each 2-d pair of the binary Q and K vectors, so q_rot . k_rot is a sum, over pairs of
coinciding spikes, of fixed cos/sin coefficients: one accumulate per coinciding pair (Q and K spikes
assumed independent). Weights . V adds the attention weight once per V spike. Norms, residual adds,
the RoPE tables, GELU and the embedding lookup are left out of both models.

Energy uses 45 nm arithmetic figures: 0.9 pJ per 32-bit float AC and 4.6 pJ per 32-bit float MAC
(M. Horowitz, "Computing's energy problem", ISSCC 2014). It counts arithmetic only and ignores memory
traffic (weight and activation reads usually dominate on real hardware): an estimate of the
arithmetic, not of a chip. "body" is everything but the LM head.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

AC_PJ = 0.9  # 32-bit float add, 45 nm (Horowitz, ISSCC 2014)
MAC_PJ = 4.6  # 32-bit float multiply (3.7 pJ) + add (0.9 pJ), 45 nm (Horowitz, ISSCC 2014)
ENERGY_NOTE = (
    "estimate from 45 nm arithmetic energies (0.9 pJ per accumulate, 4.6 pJ per multiply-accumulate; "
    "Horowitz, ISSCC 2014); counts arithmetic only and ignores memory traffic, which usually dominates"
)
HEAD = "lm_head"


def is_spike_code(x: torch.Tensor, max_count: int) -> bool:
    """True when every value of x is an integer in -max_count..max_count (binary or ternary spikes,
    or spike counts)."""
    if not x.is_floating_point():
        return False
    if x.numel() == 0:
        return True
    return bool(((x.abs() <= max_count) & (x == torch.round(x))).all())


@dataclass
class MatmulOps:
    """What one weight matmul received over a measurement (summed over calls)."""

    fan_in: int
    fan_out: int
    ac: float = 0.0
    mac: float = 0.0
    spike_calls: int = 0
    real_calls: int = 0
    zero_input_calls: int = 0  # calls whose input was all zeros: a silent branch

    @property
    def operand(self) -> str:
        if self.real_calls and self.spike_calls:
            return "mixed"
        return "spikes" if self.spike_calls else "real"


class MatmulCounter(TorchFunctionMode):
    """Counts AC/MAC operations of every `F.linear` call inside the `with` block, by operand.

    `ops` maps a weight's parameter name (the LM head, tied or folded, is "lm_head") to `MatmulOps`.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.max_count = int(getattr(model, "timesteps", 1))
        self.vocab = int(model.config.vocab_size)
        self.names = {p.data_ptr(): n.removesuffix(".weight") for n, p in model.named_parameters()}
        self.ops: dict[str, MatmulOps] = {}

    def _name(self, weight: torch.Tensor) -> str:
        name = self.names.get(weight.data_ptr())
        if name is None or name == "embed":  # tied or gain-folded head weight
            return HEAD if weight.shape[0] == self.vocab else f"linear[{weight.shape[1]}x{weight.shape[0]}]"
        return name

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            x, w = args[0], args[1] if len(args) > 1 else kwargs["weight"]
            fan_out, fan_in = w.shape
            rec = self.ops.setdefault(self._name(w), MatmulOps(fan_in=fan_in, fan_out=fan_out))
            if is_spike_code(x, self.max_count):
                rec.spike_calls += 1
                rec.ac += float(x.abs().sum(dtype=torch.float64)) * fan_out  # a -1 spike: one subtract
            else:
                rec.real_calls += 1
                rec.mac += float(x.numel()) * fan_out
            rec.zero_input_calls += int(x.numel() > 0 and not bool(x.any()))
        return func(*args, **kwargs)


def qkv_parts(cfg: Any) -> tuple[tuple[str, slice], ...]:
    """The q, k and v channel slices of a fused Q/K/V projection's output (its LIF's channels)."""
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    return (("q", slice(0, q)), ("k", slice(q, q + kv)), ("v", slice(q + kv, q + 2 * kv)))


def _attention_and_neurons(
    cfg: Any, timesteps: int, layers: dict[str, dict[str, Any]], mean_context: float
) -> tuple[dict[str, float], dict[str, float], dict[str, float]]:
    """Per-token (spiking AC, spiking MAC, ANN MAC) for attention and the LIF updates (table above)."""
    h, hd, c, t = cfg.num_heads, cfg.head_dim, float(mean_context), timesteps
    pairs = t * t if cfg.count_coded else t  # timestep pairs whose spikes meet in a score
    passes = cfg.passes
    snn_ac = {"scores": 0.0, "attn_values": 0.0}
    snn_mac = {"softmax": 0.0, "lif_updates": 0.0}
    ann = {
        "scores": float(cfg.depth * h * c * hd),
        "softmax": float(cfg.depth * h * c),
        "attn_values": float(cfg.depth * h * c * hd),
    }
    if not cfg.spiking:
        return {}, {}, ann
    for i in range(cfg.depth):
        qkv = layers.get(f"blocks.{i}.attn.qkv", {})
        snn_ac["scores"] += pairs * h * c * 2 * hd * qkv.get("rate_q", 0.0) * qkv.get("rate_k", 0.0)
        snn_ac["attn_values"] += t * h * c * hd * qkv.get("rate_v", 0.0)
        snn_mac["softmax"] += passes * h * c
    snn_mac["lif_updates"] = float(t * sum(e["neurons"] for e in layers.values()))
    return snn_ac, snn_mac, ann


def _totals(ac: dict[str, float], mac: dict[str, float]) -> dict[str, float]:
    energy = (sum(ac.values()) * AC_PJ + sum(mac.values()) * MAC_PJ) / 1e3
    head = (ac.get(HEAD, 0.0) * AC_PJ + mac.get(HEAD, 0.0) * MAC_PJ) / 1e3
    return {"ac": sum(ac.values()), "mac": sum(mac.values()), "energy_nj": energy, "body_energy_nj": energy - head}


def _ratio(a: float, b: float) -> float | None:
    return a / b if b else None


def operation_counts(
    model: torch.nn.Module,
    matmuls: dict[str, MatmulOps],
    tokens: int,
    layers: dict[str, dict[str, Any]],
    mean_context: float,
) -> dict[str, Any]:
    """Operations and energy per token of the measured model and of its ANN twin.

    `matmuls`: a `MatmulCounter`'s ops over `tokens` tokens; `layers`: per-LIF statistics
    (`evaluate.spike_statistics`) for the attention terms.
    """
    cfg = model.config
    n = max(int(tokens), 1)
    snn_ac, snn_mac, ann = _attention_and_neurons(cfg, model.timesteps, layers, mean_context)
    per_matmul = {}
    for name, op in matmuls.items():
        ann[name] = float(op.fan_in * op.fan_out)
        if cfg.spiking:
            snn_ac[name], snn_mac[name] = op.ac / n, op.mac / n
        per_matmul[name] = {
            "operand": op.operand,
            "ac_per_token": op.ac / n,
            "mac_per_token": op.mac / n,
            "ann_mac_per_token": ann[name],
            "zero_input_calls": op.zero_input_calls,
        }
    a = _totals({}, ann)
    out: dict[str, Any] = {
        "ann_macs_per_token": a["mac"],
        "ann_energy_nj_per_token": a["energy_nj"],
        "matmuls": per_matmul,
        "silent_matmuls": sorted(k for k, v in matmuls.items() if v.zero_input_calls),
        "breakdown_per_token": {"ann_mac": ann},
    }
    if not cfg.spiking:  # the model is the ANN twin: only its own figures apply
        out["without_lm_head"] = {"ann_energy_nj": a["body_energy_nj"]}
        return out
    s = _totals(snn_ac, snn_mac)
    out.update(
        snn_synops_per_token=s["ac"],
        snn_macs_per_token=s["mac"],
        snn_energy_nj_per_token=s["energy_nj"],
        energy_ratio_snn_to_ann=_ratio(s["energy_nj"], a["energy_nj"]),
        without_lm_head={
            "snn_energy_nj": s["body_energy_nj"],
            "ann_energy_nj": a["body_energy_nj"],
            "energy_ratio_snn_to_ann": _ratio(s["body_energy_nj"], a["body_energy_nj"]),
        },
        breakdown_per_token={"snn_ac": snn_ac, "snn_mac": snn_mac, "ann_mac": ann},
    )
    return out


def training_energy_ratios(model: torch.nn.Module, mean_context: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(whole model, body) energy per token of a spiking student over its ANN twin's, as 0-dim
    tensors in the autograd graph: `operation_counts`'s accounting applied to the spikes per channel
    that the LIFs kept in the last forward (`SpikingStudentLM.keep_spike_counts`). Its gradient
    reaches every spike through the surrogate: an energy budget's penalty in training."""
    cfg, t = model.config, model.timesteps
    layers: dict[str, dict[str, Any]] = {}
    for m in model.lif_modules():
        c = m.last_counts
        if c is None:
            raise RuntimeError(f"{m.stat_name} kept no spike counts: call keep_spike_counts(True) before the forward")
        entry: dict[str, Any] = {"neurons": c.numel()}
        if m.stat_name.endswith(".qkv"):
            for part, sl in qkv_parts(cfg):
                entry[f"rate_{part}"] = c[sl].sum() / (m.last_tokens * t * c[sl].numel())
        layers[m.stat_name] = entry
    matmuls = {}
    for name, fan_in, fan_out, src in model.weight_matmuls():
        if isinstance(src, int):  # a real-valued operand: src rows of fan_in values per token
            matmuls[name] = MatmulOps(fan_in=fan_in, fan_out=fan_out, mac=float(src * fan_in * fan_out))
        else:
            ac = src.last_counts.sum() / max(src.last_tokens, 1) * fan_out
            matmuls[name] = MatmulOps(fan_in=fan_in, fan_out=fan_out, ac=ac)  # type: ignore[arg-type]
    rep = operation_counts(model, matmuls, 1, layers, mean_context)
    return rep["energy_ratio_snn_to_ann"], rep["without_lm_head"]["energy_ratio_snn_to_ann"]
