"""`SpikingStudentLM` and its same-shape non-spiking twin, in two layouts (`snn_config.mode`).

T timesteps are folded into the batch: the residual stream is x [T*B, S, D], real-valued, and the
token embedding is repeated over the T timesteps (direct encoding). LIF neurons integrate over the T
timesteps of each token, so a token's spikes never depend on later tokens, and the key/value spikes
of earlier positions can be cached exactly for decoding.

hybrid (the original student): spikes feed attention and the MLP down-projection only.

    q, k, v = LIF(W_qkv RMSNorm(x))          binary Q/K/V                  [T*B, S, (H + 2*Hkv) * hd]
    x = x + W_o attention(rope(q), rope(k), v)
    x = x + W_down LIF(W_up RMSNorm(x))
    logits = W_head RMSNorm(mean_T x)         the head reads real values

spike-driven: every weight matmul reads a spike code (Spike-driven Transformer style; the residual
stays real and each branch starts with a LIF on its normalised input).

    q, k, v = LIF(W_qkv LIF(RMSNorm(x)))       binary Q/K/V; scores from binary Q and K
    x = x + W_o LIF(RMSNorm(attention(rope(q), rope(k), v)))
    x = x + W_down LIF(W_up LIF(RMSNorm(x)))
    logits = (W_head * g / T) c,  c = sum_T LIF(RMSNorm(x))   per-token spike counts in 0..T; the
                                                  per-channel gain g and 1/T fold into the head weight

Every LIF there has a per-channel threshold, calibrated on the first training batch to fire at
`target_rate`, optionally kept there by homeostatic adaptation while training, or learnable (with a
learnable leak). Every weight matmul goes through
`F.linear`, so profilers, hooks and the energy accounting (energy.py) see each one and its operand.

Count coding (`coding = "count"`, either layout): every layer runs once per token instead of T
times. The residual stream is x [B, S, D]; each LIF integrates its token's input over the T steps and
emits spike counts c in 0..T (counting.py: the constant-current LIF, exactly expandable into T
binary spikes); a weight matmul reads c and scales its output by 1/T (folds into the weight), so it
sees the token's mean rate, as the temporal model's average over T does. Attention reads Q, K, V as
rates c/T; the decode cache keeps the counts (uint8, one row per sequence instead of T).

RoPE is applied to the spike vectors, not the currents: a rotation is a fixed linear map, so the
score between two spike vectors still depends only on their relative position. The decode cache
keeps keys *before* RoPE (exactly 0/1 for a spiking student) and rotates them when read.

The ANN twin (`student_type="ann"`) has identical weights in the same layout, and no spikes: no
activation where a LIF feeds Q/K/V, the attention output or the head; GELU in the MLP; one timestep.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .config import ARCHITECTURE_VERSION, StudentConfig
from .neurons import LIF, TernaryLIF

# One layer's cached keys (before RoPE) and values: ([T*B, Hkv, S_past, hd], [T*B, Hkv, S_past, hd]).
KVCache = tuple[torch.Tensor, torch.Tensor]


def fake_quant_int8(w: torch.Tensor) -> torch.Tensor:
    """Symmetric int8 fake quantization of each row (the last dim) with a straight-through gradient: a
    weight [out, in] per output channel, or gathered embedding rows [..., D] per token (the forward sees
    int8-rounded values, the backward is identity). The scale is the row's max |value| / 127, as ONNX
    Runtime's symmetric per-channel int8 quantizer computes it."""
    scale = w.detach().abs().amax(dim=-1, keepdim=True).clamp_min(1e-8) / 127.0
    q = torch.clamp(torch.round(w / scale), -127, 127) * scale
    return w + (q - w).detach()


class QLinear(nn.Linear):
    """nn.Linear without bias whose weight is fake-quantized to int8 with QAT, in training and in
    evaluation alike: the int8-rounded weight is the one the student learned to compute with.

    `in_scale` multiplies the output (a constant that folds into the weight): 1/T where the input
    is a count-coded spike code (counts 0..T), so the layer sees the token's mean spike rate.
    """

    def __init__(self, in_features: int, out_features: int, qat: bool = False, in_scale: float = 1.0) -> None:
        super().__init__(in_features, out_features, bias=False)
        self.qat = qat
        self.in_scale = float(in_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = fake_quant_int8(self.weight) if self.qat else self.weight
        y = F.linear(x, w)  # the matmul reads x itself (spike counts stay integers for energy.py)
        return y if self.in_scale == 1.0 else y * self.in_scale


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
    """Rotate-half RoPE. x: [N, H, S, hd], cos/sin: [S, hd] (cast to x's dtype: fp32 tables must not
    promote bf16 q/k under autocast)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: StudentConfig, name: str) -> None:
        super().__init__()
        self.cfg = cfg
        hd, h, hkv = cfg.head_dim, cfg.num_heads, cfg.num_kv_heads
        sd = cfg.spike_driven
        sd_scale = _count_scale(cfg) if sd else 1.0
        self.in_lif = _make_lif(cfg, f"{name}.in", cfg.dim, signed=True) if cfg.spiking and sd else None
        self.qkv = QLinear(cfg.dim, (h + 2 * hkv) * hd, qat=cfg.qat_int8, in_scale=sd_scale)
        self.lif = _make_lif(cfg, f"{name}.qkv", (h + 2 * hkv) * hd) if cfg.spiking else None
        self.out_norm = RMSNorm(h * hd, cfg.norm_eps) if sd else None
        self.out_lif = _make_lif(cfg, f"{name}.out", h * hd, signed=True) if cfg.spiking and sd else None
        self.proj = QLinear(h * hd, cfg.dim, qat=cfg.qat_int8, in_scale=sd_scale)
        self.code_scale = _count_scale(cfg)  # count-coded Q/K/V: counts -> rates for attention

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, past: KVCache | None
    ) -> tuple[torch.Tensor, KVCache]:
        """x: [N, S, D] (N = T*B), cos/sin [S_past + S, hd] -> ([N, S, D], present kv [N, Hkv, S_past + S, hd])."""
        cfg = self.cfg
        n, s, _ = x.shape
        hd, h, hkv = cfg.head_dim, cfg.num_heads, cfg.num_kv_heads
        if self.in_lif is not None:
            x = self.in_lif(x)
        qkv = self.qkv(x)
        if self.lif is not None:
            qkv = self.lif(qkv)
        q, k, v = qkv.split([h * hd, hkv * hd, hkv * hd], dim=-1)
        q = apply_rope(q.view(n, s, h, hd).transpose(1, 2), cos[-s:], sin[-s:])
        k = k.view(n, s, hkv, hd).transpose(1, 2)
        v = v.view(n, s, hkv, hd).transpose(1, 2)
        if past is not None:
            k = torch.cat([past[0].to(k.dtype), k], dim=2)
            v = torch.cat([past[1].to(v.dtype), v], dim=2)
        present = (k, v)  # keys before RoPE: exactly 0/1 (count-coded: 0..T) for a spiking student
        if self.code_scale != 1.0:
            q, k, v = q * self.code_scale, k * self.code_scale, v * self.code_scale
        k = apply_rope(k, cos, sin)
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
        if self.out_norm is not None:
            a = self.out_norm(a)
        if self.out_lif is not None:
            a = self.out_lif(a)
        return self.proj(a), present


class MLP(nn.Module):
    def __init__(self, cfg: StudentConfig, name: str) -> None:
        super().__init__()
        self.in_lif = _make_lif(cfg, f"{name}.in", cfg.dim, signed=True) if cfg.spiking and cfg.spike_driven else None
        up_scale = _count_scale(cfg) if cfg.spike_driven else 1.0
        self.up = QLinear(cfg.dim, cfg.hidden_dim, qat=cfg.qat_int8, in_scale=up_scale)
        self.down = QLinear(cfg.hidden_dim, cfg.dim, qat=cfg.qat_int8, in_scale=_count_scale(cfg))
        self.lif = _make_lif(cfg, f"{name}.up", cfg.hidden_dim) if cfg.spiking else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.in_lif is not None:
            x = self.in_lif(x)
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


def _count_scale(cfg: StudentConfig) -> float:
    """1/T for a matmul whose input a count-coded LIF makes, else 1."""
    return 1.0 / cfg.num_timesteps if cfg.count_coded else 1.0


def _make_lif(cfg: StudentConfig, name: str, channels: int, signed: bool = False) -> LIF:
    """signed: a LIF on a normalised (symmetric) input, ternary with `cfg.ternary`."""
    per_channel = cfg.per_channel_neurons
    calibrated = cfg.spike_driven or cfg.count_coded
    lif = (TernaryLIF if signed and cfg.ternary else LIF)(
        num_timesteps=cfg.num_timesteps,
        decay=cfg.decay,
        threshold=cfg.threshold,
        surrogate=cfg.surrogate,
        slope=cfg.surrogate_slope,
        fused=cfg.fused_lif,
        kernel=cfg.lif_kernel,
        channels=channels if per_channel else None,
        learn_threshold=cfg.learn_threshold,
        learn_decay=cfg.learn_decay,
        target_rate=cfg.target_rate if calibrated else None,
        homeostasis=cfg.homeostasis if calibrated else 0.0,
        rate_floor=cfg.rate_floor if per_channel else 0.0,
        count=cfg.count_coded,
    )
    lif.stat_name = name
    return lif


def pack_spikes(x: torch.Tensor) -> torch.Tensor:
    """Bit-pack 0/1 values along the last dim: [..., n] float -> [..., ceil(n / 8)] uint8."""
    n = x.shape[-1]
    pad = (-n) % 8
    bits = F.pad(x.to(torch.uint8), (0, pad)).view(*x.shape[:-1], -1, 8)
    weights = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8, device=x.device)
    return (bits * weights).sum(-1, dtype=torch.uint8)


def unpack_spikes(packed: torch.Tensor, n: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of `pack_spikes`: [..., ceil(n / 8)] uint8 -> [..., n] of 0/1 in `dtype`."""
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    bits = (packed.unsqueeze(-1) >> shifts) & 1
    return bits.reshape(*packed.shape[:-1], -1)[..., :n].to(dtype)


def pack_kv_cache(past: tuple[KVCache, ...], count_coded: bool = False) -> tuple[KVCache, ...]:
    """A spiking student's cache made compact: per layer ([rows, Hkv, S, hd] keys and values) ->
    bit-packed uint8 [rows, Hkv, S, ceil(hd / 8)] for 0/1 spikes (32x smaller than float32), or
    uint8 [rows, Hkv, S, hd] for the spike counts 0..T of a count-coded student (4x smaller)."""
    if count_coded:
        return tuple((k.to(torch.uint8), v.to(torch.uint8)) for k, v in past)
    return tuple((pack_spikes(k), pack_spikes(v)) for k, v in past)


def unpack_kv_cache(packed: tuple[KVCache, ...], head_dim: int, count_coded: bool = False) -> tuple[KVCache, ...]:
    """Inverse of `pack_kv_cache`: float32 caches [rows, Hkv, S, head_dim]."""
    if count_coded:
        return tuple((k.float(), v.float()) for k, v in packed)
    return tuple((unpack_spikes(k, head_dim), unpack_spikes(v, head_dim)) for k, v in packed)


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
        sd = config.spike_driven
        # spike-driven readout: per-token spike counts of a LIF on the final norm, and a per-channel
        # gain on them that folds into the head weight
        self.head_lif = _make_lif(config, "head.in", config.dim, signed=True) if config.spiking and sd else None
        self.head_gain = nn.Parameter(torch.ones(config.dim)) if sd else None
        self.lm_head = None if config.tie_embeddings else QLinear(config.dim, config.vocab_size, config.qat_int8)
        self.qat = config.qat_int8  # fake-quantize the embedding and head rows too (bake_int8_weights turns it off)
        self._folded_head: tuple[tuple, torch.Tensor] | None = None  # lm_head_weight without autograd, by version
        inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, config.head_dim, 2).float() / config.head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.reset_parameters()

    @property
    def timesteps(self) -> int:
        """Simulated timesteps per token (1 for the ANN twin); spike codes hold counts 0..timesteps."""
        return self.config.num_timesteps if self.config.spiking else 1

    @property
    def passes(self) -> int:
        """Rows of the residual stream (and of the decode cache) per token (`StudentConfig.passes`)."""
        return self.config.passes

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
    def _head_matrix(self) -> torch.Tensor:
        """[V, D] the output projection's own parameter: the embedding matrix when tied."""
        return self.embed.weight if self.lm_head is None else self.lm_head.weight

    @property
    def lm_head_weight(self) -> torch.Tensor:
        """[V, D] output projection (the embedding matrix when tied), with the spike-driven
        readout's gain and 1/T folded in, so that `F.linear(forward_hidden(ids), lm_head_weight)`
        gives the logits."""
        w = self._head_matrix
        if self.head_gain is None and not self.qat:
            return w
        if torch.is_grad_enabled():
            self._folded_head = None  # training: do not hold a [V, D] copy between evaluations
            return self._fold_head(w)
        # Without autograd (evaluation, decoding) fold once per weight version: the [V, D] multiply
        # would otherwise cost more than the rest of a decoded token.
        g = self.head_gain
        key = (w.data_ptr(), w._version, w.dtype, w.device, self.qat, None if g is None else (g.data_ptr(), g._version))
        if self._folded_head is None or self._folded_head[0] != key:
            self._folded_head = (key, self._fold_head(w))
        return self._folded_head[1]

    def _fold_head(self, w: torch.Tensor) -> torch.Tensor:
        """The head matrix [V, D] -> int8-rounded with QAT, times the readout's gain / T when spike-driven."""
        if self.qat:
            w = fake_quant_int8(w)
        if self.head_gain is not None:
            w = w * (self.head_gain / self.timesteps).to(w.dtype)
        return w

    def _body(
        self, input_ids: torch.Tensor, past: tuple[KVCache, ...] | None
    ) -> tuple[torch.Tensor, tuple[KVCache, ...]]:
        """input_ids [B, S] -> (final-normed hidden averaged over T [B, S, D], present caches)."""
        b, s = input_ids.shape
        t = self.passes
        offset = 0 if past is None else past[0][0].shape[2]
        x = self.embed(input_ids)  # [B, S, D]
        if self.qat:  # the int8 export looks tokens up in the head's per-row int8 matrix
            x = fake_quant_int8(x)
        if t > 1:
            x = x.unsqueeze(0).expand(t, b, s, x.shape[-1]).reshape(t * b, s, x.shape[-1])
        cos, sin = rope_cos_sin(self.inv_freq, 0, offset + s, x.dtype)  # cached keys are rotated on read
        presents = []
        for i, blk in enumerate(self.blocks):
            layer_past = None if past is None else past[i]
            if self.config.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x, present = checkpoint(blk, x, cos, sin, layer_past, use_reentrant=False)
            else:
                x, present = blk(x, cos, sin, layer_past)
            presents.append(present)
        return self._readout(x, b, s), tuple(presents)

    def _readout(self, x: torch.Tensor, b: int, s: int) -> torch.Tensor:
        """Residual stream [T*B, S, D] -> the LM head's input [B, S, D]."""
        t = self.passes
        if self.head_lif is not None:  # spike counts in 0..T (ternary: -T..T) per token and channel
            counts = self.head_lif(self.norm(x)).view(t, b, s, -1).sum(0)
            if t > 1 and self.head_lif.keep_counts and torch.is_grad_enabled():
                # the head reads each token's summed count: ternary spikes of opposite sign cancel there
                self.head_lif.last_counts = counts.abs().reshape(-1, counts.shape[-1]).sum(0, dtype=torch.float32)
            return counts
        if t > 1:
            x = x.view(t, b, s, -1).mean(0)  # rate readout: average the residual stream over T
        return self.norm(x)

    def forward_hidden(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids [B, S] -> the LM head's input [B, S, D] (spike counts in spike-driven mode); the
        logits are `F.linear(hidden, lm_head_weight)` (for chunked losses)."""
        return self._body(input_ids, None)[0]

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids [B, S] int64 -> logits [B, S, V] float32."""
        return self._head(self.forward_hidden(input_ids))

    def _head(self, h: torch.Tensor) -> torch.Tensor:
        """The LM head's input [B, S, D] -> logits [B, S, V] float32. An ONNX export scales the input
        by the readout's gain / T instead of folding it into the weight, so that a tied head stays one
        matrix with the embedding in the file (the same logits, up to rounding)."""
        if self.head_gain is not None and torch.onnx.is_in_onnx_export():
            return F.linear(h * (self.head_gain / self.timesteps).to(h.dtype), self._head_matrix).float()
        return F.linear(h, self.lm_head_weight).float()

    def forward_step(
        self, input_ids: torch.Tensor, past: tuple[KVCache, ...] | None = None
    ) -> tuple[torch.Tensor, tuple[KVCache, ...]]:
        """Incremental decoding: input_ids [B, S_new] continue the sequence cached in `past`.

        Returns (logits [B, S_new, V], present) where present holds, per layer, the key (before RoPE)
        and value tensors [T*B, Hkv, S_past + S_new, hd], 0/1 for a spiking student; each new token
        costs one position of work. `past` may be of any dtype (uint8 from the decode graph).
        """
        h, present = self._body(input_ids, past)
        return self._head(h), present

    # ---- int8 weights (QAT) ----
    def bake_int8_weights(self) -> None:
        """With QAT: store every weight matrix (embedding and head included) as its int8-rounded value and
        stop fake-quantizing. The model computes the same function without re-rounding its weights on
        every forward (the head's on every decoded token), and an export carries exactly these weights.
        The float shadow weights are gone, so bake only a student that is done training."""
        if not self.config.qat_int8:
            return
        with torch.no_grad():
            for m in self.modules():
                if isinstance(m, QLinear) and m.qat:
                    m.weight.copy_(fake_quant_int8(m.weight))
                    m.qat = False
            self.embed.weight.copy_(fake_quant_int8(self.embed.weight))
        self.qat = False

    @contextlib.contextmanager
    def int8_weights(self) -> Iterator[None]:
        """With QAT: hold the int8-rounded weights in the parameters for the duration (the same function;
        `energy.MatmulCounter` names each matmul by its weight parameter, which fake quantization would
        hide), then restore the float shadow weights and the fake quantization. Without QAT: nothing."""
        if not self.qat:
            yield
            return
        shadow = {n: p.detach().clone() for n, p in self.named_parameters() if p.dim() == 2}
        self.bake_int8_weights()
        try:
            yield
        finally:
            with torch.no_grad():
                for n, p in self.named_parameters():
                    if n in shadow:
                        p.copy_(shadow[n])
            for m in self.modules():
                if isinstance(m, QLinear):
                    m.qat = True
            self.qat = True

    # ---- spike statistics (read by logging and evaluation) ----
    def lif_modules(self) -> list[LIF]:
        return [m for m in self.modules() if isinstance(m, LIF)]

    def weight_matmuls(self) -> list[tuple[str, int, int, LIF | int]]:
        """Every weight matmul as (name as `energy.MatmulCounter` names it, fan_in, fan_out, operand):
        the operand is the LIF whose spike code it reads, or the rows per token of a real-valued input."""
        cfg, rows = self.config, self.passes
        out: list[tuple[str, int, int, LIF | int]] = []
        for i, blk in enumerate(self.blocks):
            a, m = blk.attn, blk.mlp
            for name, lin, src in (
                ("attn.qkv", a.qkv, a.in_lif),
                ("attn.proj", a.proj, a.out_lif),
                ("mlp.up", m.up, m.in_lif),
                ("mlp.down", m.down, m.lif),
            ):
                out.append((f"blocks.{i}.{name}", lin.in_features, lin.out_features, src if src is not None else rows))
        head_src = self.head_lif if self.head_lif is not None else 1  # the head reads the mean over T
        out.append(("lm_head", cfg.dim, cfg.vocab_size, head_src))
        return out

    def keep_spike_counts(self, on: bool) -> None:
        """Keep each LIF's per-channel spike sums in the autograd graph (`LIF.keep_counts`), for an
        energy budget in training (energy.training_energy_ratios)."""
        for m in self.lif_modules():
            m.keep_counts = on
            m.last_counts = None

    def apply_rate_floor(self, step: float) -> None:
        """After an optimizer step: lower the thresholds of the channels that fired below their rate
        floor during it, by the log-step `step` (`LIF.apply_rate_floor`)."""
        for m in self.lif_modules():
            m.floor_step = step
            m.apply_rate_floor()

    def spike_rates(self) -> dict[str, float]:
        """Mean spike rate of each LIF layer during the last forward pass."""
        return {m.stat_name: float(m.last_spike_rate) for m in self.lif_modules() if m.last_spike_rate is not None}

    def set_record_stats(self, on: bool) -> None:
        for m in self.lif_modules():
            m.record_stats = on
            m.reset_stats()

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
