"""`SpikingStudentLM` and its same-shape non-spiking twin.

Layout of one block (pre-norm, real-valued residual stream, T folded into the batch):

    x: [T*B, S, D]
    h = RMSNorm(x)
    q, k, v = LIF(W_qkv h)            spiking Q/K/V, binary        [T*B, S, (H + 2*Hkv) * hd]
    a = causal_attention(rope(q), rope(k), v)   per timestep       [T*B, S, D]
    x = x + W_o a
    s = LIF(W_up RMSNorm(x))          spiking hidden layer, binary [T*B, S, F]
    x = x + W_down s

The token embedding is repeated over the T timesteps (direct encoding); the readout averages the
residual stream over T and applies the LM head once. LIF neurons integrate over the T timesteps of
each token, so a token's spikes never depend on later tokens, and the key/value spikes of earlier
positions can be cached exactly for decoding.

RoPE is applied to the spike vectors, not the currents: a rotation is a fixed linear map, so the
score between two spike vectors still depends only on their relative position.

The ANN twin (`student_type="ann"`) has identical parameters; it uses no activation on Q/K/V,
GELU in the MLP, and a single "timestep".
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .config import ARCHITECTURE_VERSION, StudentConfig
from .neurons import LIF

# One layer's cached keys and values: ([T*B, Hkv, S_past, hd], [T*B, Hkv, S_past, hd]).
KVCache = tuple[torch.Tensor, torch.Tensor]


def fake_quant_int8(w: torch.Tensor) -> torch.Tensor:
    """Symmetric per-output-channel int8 fake quantization of a weight [out, in] with a
    straight-through gradient (the forward sees int8-rounded weights, the backward is identity)."""
    scale = w.detach().abs().amax(dim=1, keepdim=True).clamp_min(1e-8) / 127.0
    q = torch.clamp(torch.round(w / scale), -127, 127) * scale
    return w + (q - w).detach()


class QLinear(nn.Linear):
    """nn.Linear without bias whose weight is fake-quantized to int8 while training with QAT."""

    def __init__(self, in_features: int, out_features: int, qat: bool = False) -> None:
        super().__init__(in_features, out_features, bias=False)
        self.qat = qat

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = fake_quant_int8(self.weight) if self.qat and self.training else self.weight
        return F.linear(x, w)


class RMSNorm(nn.Module):
    """Root-mean-square normalisation over the last dim, computed in fp32 (written out by hand so
    the ONNX exporter emits plain ops at opset 17)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        acc = torch.promote_types(x.dtype, torch.float32)
        xf = x.to(acc)
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * self.weight.to(acc)).to(x.dtype)


def rope_cos_sin(
    inv_freq: torch.Tensor, offset: int | torch.Tensor, length: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables [length, hd] for positions offset .. offset+length-1."""
    pos = torch.arange(length, device=inv_freq.device, dtype=torch.float32) + offset
    freqs = pos[:, None] * inv_freq[None, :]  # [S, hd/2]
    emb = torch.cat([freqs, freqs], dim=-1)  # [S, hd]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE. x: [N, H, S, hd], cos/sin: [S, hd]."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class Attention(nn.Module):
    def __init__(self, cfg: StudentConfig, name: str) -> None:
        super().__init__()
        self.cfg = cfg
        hd, h, hkv = cfg.head_dim, cfg.num_heads, cfg.num_kv_heads
        self.qkv = QLinear(cfg.dim, (h + 2 * hkv) * hd, qat=cfg.qat_int8)
        self.proj = QLinear(h * hd, cfg.dim, qat=cfg.qat_int8)
        self.lif = _make_lif(cfg, f"{name}.qkv") if cfg.spiking else None

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, past: KVCache | None
    ) -> tuple[torch.Tensor, KVCache]:
        """x: [N, S, D] (N = T*B) -> ([N, S, D], present kv [N, Hkv, S_past + S, hd])."""
        cfg = self.cfg
        n, s, _ = x.shape
        hd, h, hkv = cfg.head_dim, cfg.num_heads, cfg.num_kv_heads
        qkv = self.qkv(x)
        if self.lif is not None:
            qkv = self.lif(qkv)
        q, k, v = qkv.split([h * hd, hkv * hd, hkv * hd], dim=-1)
        q = apply_rope(q.view(n, s, h, hd).transpose(1, 2), cos, sin)
        k = apply_rope(k.view(n, s, hkv, hd).transpose(1, 2), cos, sin)
        v = v.view(n, s, hkv, hd).transpose(1, 2)
        if past is not None:
            k = torch.cat([past[0], k], dim=2)
            v = torch.cat([past[1], v], dim=2)
        present = (k, v)
        if hkv != h:
            k = k.repeat_interleave(h // hkv, dim=1)
            v = v.repeat_interleave(h // hkv, dim=1)
        if past is None:
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        elif s == 1:
            a = F.scaled_dot_product_attention(q, k, v)
        else:
            # New queries sit at the end of the key sequence: causal mask aligned bottom-right.
            total = k.shape[2]
            qi = torch.arange(s, device=x.device)[:, None] + (total - s)
            mask = torch.arange(total, device=x.device)[None, :] <= qi
            a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        a = a.transpose(1, 2).reshape(n, s, h * hd)
        return self.proj(a), present


class MLP(nn.Module):
    def __init__(self, cfg: StudentConfig, name: str) -> None:
        super().__init__()
        self.up = QLinear(cfg.dim, cfg.hidden_dim, qat=cfg.qat_int8)
        self.down = QLinear(cfg.hidden_dim, cfg.dim, qat=cfg.qat_int8)
        self.lif = _make_lif(cfg, f"{name}.up") if cfg.spiking else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.up(x)
        h = self.lif(h) if self.lif is not None else F.gelu(h)
        return self.down(h)


class Block(nn.Module):
    def __init__(self, cfg: StudentConfig, index: int) -> None:
        super().__init__()
        self.norm1 = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = Attention(cfg, f"blocks.{index}.attn")
        self.norm2 = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = MLP(cfg, f"blocks.{index}.mlp")

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, past: KVCache | None = None
    ) -> tuple[torch.Tensor, KVCache]:
        a, present = self.attn(self.norm1(x), cos, sin, past)
        x = x + a
        x = x + self.mlp(self.norm2(x))
        return x, present


def _make_lif(cfg: StudentConfig, name: str) -> LIF:
    lif = LIF(
        num_timesteps=cfg.num_timesteps,
        decay=cfg.decay,
        threshold=cfg.threshold,
        surrogate=cfg.surrogate,
        slope=cfg.surrogate_slope,
        fused=cfg.fused_lif,
    )
    lif.stat_name = name
    return lif


class SpikingStudentLM(nn.Module):
    """Decoder-only LM with LIF neurons simulated for `num_timesteps` steps per token.

    `forward(input_ids [B, S]) -> logits [B, S, V]` (float32).
    """

    architecture_version = ARCHITECTURE_VERSION

    def __init__(self, config: StudentConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.dim)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.depth))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.lm_head = (
            None if config.tie_embeddings else QLinear(config.dim, config.vocab_size, config.qat_int8)
        )
        inv_freq = 1.0 / (
            config.rope_theta ** (torch.arange(0, config.head_dim, 2).float() / config.head_dim)
        )
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.reset_parameters()

    @property
    def timesteps(self) -> int:
        """Simulated timesteps per token (1 for the ANN twin)."""
        return self.config.num_timesteps if self.config.spiking else 1

    def reset_parameters(self) -> None:
        cfg = self.config
        nn.init.normal_(self.embed.weight, std=0.02)
        for blk in self.blocks:
            # Input projections see unit-RMS activations; std 1/sqrt(D) keeps currents O(1), i.e.
            # of the order of the firing threshold, so neurons fire from the first step.
            nn.init.normal_(blk.attn.qkv.weight, std=1.0 / math.sqrt(cfg.dim))
            nn.init.normal_(blk.mlp.up.weight, std=1.0 / math.sqrt(cfg.dim))
            # Residual branches start small (GPT-2's 1/sqrt(2*depth) scaling).
            out_std = 0.02 / math.sqrt(2 * cfg.depth)
            nn.init.normal_(blk.attn.proj.weight, std=out_std)
            nn.init.normal_(blk.mlp.down.weight, std=out_std)
        if self.lm_head is not None:
            nn.init.normal_(self.lm_head.weight, std=0.02)

    @property
    def lm_head_weight(self) -> torch.Tensor:
        """[V, D] output projection (the embedding matrix when tied)."""
        if self.lm_head is None:
            w = self.embed.weight
            return fake_quant_int8(w) if self.config.qat_int8 and self.training else w
        return (
            fake_quant_int8(self.lm_head.weight)
            if self.lm_head.qat and self.training
            else self.lm_head.weight
        )

    def _body(
        self, input_ids: torch.Tensor, past: tuple[KVCache, ...] | None
    ) -> tuple[torch.Tensor, tuple[KVCache, ...]]:
        """input_ids [B, S] -> (final-normed hidden averaged over T [B, S, D], present caches)."""
        b, s = input_ids.shape
        t = self.timesteps
        offset = 0 if past is None else past[0][0].shape[2]
        x = self.embed(input_ids)  # [B, S, D]
        if t > 1:
            x = x.unsqueeze(0).expand(t, b, s, x.shape[-1]).reshape(t * b, s, x.shape[-1])
        cos, sin = rope_cos_sin(self.inv_freq, offset, s, x.dtype)
        presents = []
        for i, blk in enumerate(self.blocks):
            layer_past = None if past is None else past[i]
            if self.config.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x, present = checkpoint(blk, x, cos, sin, layer_past, use_reentrant=False)
            else:
                x, present = blk(x, cos, sin, layer_past)
            presents.append(present)
        if t > 1:
            x = x.view(t, b, s, -1).mean(0)  # rate readout: average the residual stream over T
        return self.norm(x), tuple(presents)

    def forward_hidden(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids [B, S] -> hidden [B, S, D] that the LM head maps to logits (for chunked losses)."""
        return self._body(input_ids, None)[0]

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids [B, S] int64 -> logits [B, S, V] float32."""
        h = self.forward_hidden(input_ids)
        return F.linear(h, self.lm_head_weight).float()

    def forward_step(
        self, input_ids: torch.Tensor, past: tuple[KVCache, ...] | None = None
    ) -> tuple[torch.Tensor, tuple[KVCache, ...]]:
        """Incremental decoding: input_ids [B, S_new] continue the sequence cached in `past`.

        Returns (logits [B, S_new, V], present) where present holds, per layer, the key/value
        tensors [T*B, Hkv, S_past + S_new, hd]; each new token costs one position of work.
        """
        h, present = self._body(input_ids, past)
        return F.linear(h, self.lm_head_weight).float(), present

    # ---- spike statistics (read by logging and evaluation) ----
    def lif_modules(self) -> list[LIF]:
        return [m for m in self.modules() if isinstance(m, LIF)]

    def spike_rates(self) -> dict[str, float]:
        """Mean spike rate of each LIF layer during the last forward pass."""
        return {
            m.stat_name: float(m.last_spike_rate) for m in self.lif_modules() if m.last_spike_rate is not None
        }

    def set_record_stats(self, on: bool) -> None:
        for m in self.lif_modules():
            m.record_stats = on
            m.reset_stats()

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
