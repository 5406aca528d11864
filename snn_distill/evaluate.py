"""Is the student any good, and what do its spikes save? Fidelity and efficiency figures.

Fidelity (`evaluate_fidelity`), on the same tokens for everyone:

- student / teacher perplexity: exp of the mean next-token negative log-likelihood;
- KL(teacher || student) and top-1 agreement, averaged over every real position (temperature 1);
- unigram perplexity (`unigram_baseline`): add-one-smoothed token frequencies of the training data,
  the floor that any language model has to beat.

Efficiency (`evaluate_efficiency`), measured on evaluation data with `model.set_record_stats(True)`:

- per LIF layer: spike rate (mean over tokens, timesteps and neurons) and the share of neurons that
  never fired during the whole evaluation ("dead");
- operations and an energy estimate per token, per weight matmul and by the operand it really
  received (spikes: accumulates; real values: multiply-accumulates), for the student and its ANN
  twin, with and without the LM head: see energy.py for every term.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from .data import unigram_counts
from .energy import AC_PJ, ENERGY_NOTE, MAC_PJ, MatmulCounter, operation_counts, qkv_parts  # noqa: F401 (re-exported)

Batch = tuple[torch.Tensor, torch.Tensor]


def unigram_baseline(blocks: list[list[int]], vocab_size: int, alpha: float = 1.0) -> torch.Tensor:
    """Add-alpha smoothed unigram log-probabilities [V] of the training tokens (the floor any LM must beat)."""
    counts = unigram_counts(blocks, vocab_size).double() + alpha
    return (counts / counts.sum()).log().float()


EVAL_CHUNK_ROWS = 1024  # positions whose [chunk, V] fp32 log-probabilities are alive at a time

RowFn = Callable[[torch.Tensor], torch.Tensor]  # flat positions [c] into [B * S] -> [c, V]


def _student_rows(student: Any, ids: torch.Tensor) -> RowFn:
    """Student logits of chosen positions, fp32 [c, V]. A model with `forward_hidden` keeps only the
    hidden states [B, S, D] and applies its LM head per chunk; any other callable's logits are kept."""
    if (
        isinstance(student, torch.nn.Module)
        and hasattr(student, "forward_hidden")
        and hasattr(student, "lm_head_weight")
    ):
        hidden = student.forward_hidden(ids)
        hidden = hidden.reshape(-1, hidden.shape[-1])
        weight = student.lm_head_weight
        return lambda rows: F.linear(hidden[rows], weight).float()
    logits = student(ids)
    flat = logits.reshape(-1, logits.shape[-1])
    return lambda rows: flat[rows].float()


def _teacher_rows(teacher: Any, ids: torch.Tensor, mask: torch.Tensor) -> RowFn:
    """Teacher log-probabilities of chosen positions, fp32 [c, V].

    A teacher with `eval_logprob_rows(ids, mask)` (the logit cache) serves them itself; a `Teacher`
    (its `.logits(ids, mask)`) or any callable (ids, mask) -> logits [B, S, V] keeps its logits in its
    own dtype and device and converts one chunk at a time."""
    rows_of = getattr(teacher, "eval_logprob_rows", None)
    if callable(rows_of):
        return rows_of(ids, mask)
    fn = getattr(teacher, "logits", None)
    logits = fn(ids, mask) if callable(fn) else teacher(ids, mask)
    flat = logits.reshape(-1, logits.shape[-1])
    return lambda rows: F.log_softmax(flat[rows.to(flat.device)].float(), dim=-1)


def _batch_sums(
    s_rows: RowFn,
    t_rows: RowFn,
    ids: torch.Tensor,
    mask: torch.Tensor,
    unigram: torch.Tensor | None,
    chunk: int,
) -> torch.Tensor:
    """(KL sum, agreements, student NLL, teacher NLL, unigram NLL, positions, next-token pairs) of one
    batch, float64 [7], computed `chunk` real positions at a time: besides the logits, at most four
    [chunk, V] fp32 tensors are alive."""
    device = ids.device
    real = mask.bool()
    nxt = torch.zeros_like(real)
    nxt[:, :-1] = real[:, 1:] & real[:, :-1]
    tgt = torch.zeros_like(ids)
    tgt[:, :-1] = ids[:, 1:]
    rows = real.reshape(-1).nonzero().squeeze(1)
    has_next, target = nxt.reshape(-1)[rows], tgt.reshape(-1)[rows]
    sums = torch.zeros(7, dtype=torch.float64, device=device)
    for i in range(0, rows.numel(), chunk):
        r, hn, tg = rows[i : i + chunk], has_next[i : i + chunk], target[i : i + chunk]
        s_logp = F.log_softmax(s_rows(r), dim=-1)
        t_logp = t_rows(r).to(device)
        s_nll = -s_logp.gather(1, tg[:, None]).squeeze(1)[hn].sum()
        t_nll = -t_logp.gather(1, tg[:, None]).squeeze(1)[hn].sum()
        agree = (s_logp.argmax(-1) == t_logp.argmax(-1)).sum()
        diff = t_logp - s_logp
        del s_logp
        kl = diff.mul_(t_logp.exp_()).sum()  # sum p_t (log p_t - log p_s)
        del diff, t_logp
        u_nll = -unigram[tg][hn].sum() if unigram is not None else 0.0
        sums += torch.stack([torch.as_tensor(x, dtype=torch.float64, device=device) for x in (
            kl, agree, s_nll, t_nll, u_nll, r.numel(), hn.sum())])  # fmt: skip
    return sums


@torch.inference_mode()
def evaluate_fidelity(
    student: torch.nn.Module | Callable[[torch.Tensor], torch.Tensor],
    teacher: Any,
    batches: list[Batch],
    device: torch.device | str = "cpu",
    unigram_logprobs: torch.Tensor | None = None,
    chunk: int = EVAL_CHUNK_ROWS,
) -> dict[str, float]:
    """Student vs teacher over held-out batches of (input_ids [B, S], attention_mask [B, S]).

    `student`: a model or any callable ids [B, S] -> logits [B, S, V]; `teacher`: a `Teacher` or any
    callable (ids, mask) -> logits [B, S, V]. Perplexities are next-token perplexities on the same
    tokens; KL(teacher || student) and top-1 agreement are averaged over every real position
    (temperature 1). Computed `chunk` positions at a time (the result does not depend on `chunk`
    beyond float rounding). Returns {} when the batches hold no predictable token.
    """
    if chunk < 1:
        raise ValueError(f"evaluation chunk must be positive, got {chunk}")
    is_module = isinstance(student, torch.nn.Module)
    was_training = student.training if is_module else False
    if is_module:
        student.eval()
    unigram = unigram_logprobs.to(device) if unigram_logprobs is not None else None
    totals = torch.zeros(7, dtype=torch.float64)
    try:
        for ids, mask in batches:
            ids, mask = ids.to(device), mask.to(device)
            s_rows = _student_rows(student, ids)
            t_rows = _teacher_rows(teacher, ids, mask)
            totals += _batch_sums(s_rows, t_rows, ids, mask, unigram, chunk).cpu()
            del s_rows, t_rows  # the batch's logits go before the next batch's arrive
    finally:
        if is_module:
            student.train(was_training)
    kl_sum, agree, s_nll, t_nll, u_nll, n_pos, n_next = totals.tolist()
    if n_pos == 0 or n_next == 0:
        return {}
    res = {
        "student_perplexity": math.exp(s_nll / n_next),
        "teacher_perplexity": math.exp(t_nll / n_next),
        "kl_teacher_student": kl_sum / n_pos,
        "top1_agreement": agree / n_pos,
        "tokens": int(n_pos),
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
    {"tokens": real tokens, "mean_context": mean over tokens of (position + 1), "matmuls": the
    `MatmulCounter` ops of every weight matmul}.
    """
    was_training = model.training
    model.eval()
    tokens = 0
    ctx = 0.0
    model.set_record_stats(True)
    counter = MatmulCounter(model)
    try:
        with counter, model.int8_weights():
            for ids in _unpadded(batches):
                model(ids.to(device))
                b, s = ids.shape
                tokens += b * s
                ctx += b * s * (s + 1) / 2
    finally:
        for m in model.lif_modules():
            m.record_stats = False  # keep the counts; stop adding to them
        model.train(was_training)
    return {"tokens": tokens, "mean_context": ctx / tokens if tokens else 0.0, "matmuls": counter.ops}


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
            for part, sl in qkv_parts(cfg):
                entry[f"rate_{part}"] = float(counts[sl].sum()) / (obs * counts[sl].numel())
        stats[m.stat_name] = entry
    return stats


def efficiency_report(model: torch.nn.Module, measured: dict[str, Any], split: str | None = None) -> dict[str, Any]:
    """The `efficiency` metadata section from `measure_spikes`'s result and the counts it left in
    the model's LIF layers."""
    cfg = model.config
    layers = spike_statistics(model) if cfg.spiking else {}
    tokens, mean_context = measured["tokens"], measured["mean_context"]
    rep: dict[str, Any] = {}
    if split is not None:
        rep["split"] = split
    rep.update(
        student_type=cfg.student_type,
        mode=cfg.mode,
        tokens=int(tokens),
        timesteps=model.timesteps,
        mean_context=mean_context,
    )
    if cfg.spiking:
        neurons = sum(e["neurons"] for e in layers.values())
        obs_rates = [e["spike_rate"] * e["neurons"] for e in layers.values()]
        rep["mean_spike_rate"] = sum(obs_rates) / neurons if neurons else None
        rep["dead_fraction"] = sum(e["dead_neurons"] for e in layers.values()) / neurons if neurons else None
        rep["min_layer_spike_rate"] = min((e["spike_rate"] for e in layers.values()), default=None)
    else:
        rep["mean_spike_rate"] = rep["dead_fraction"] = rep["min_layer_spike_rate"] = None
    rep["layers"] = layers
    rep.update(operation_counts(model, measured["matmuls"], tokens, layers, mean_context))
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
    try:
        return efficiency_report(model, measure_spikes(model, batches, device), split)
    finally:
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
        if ev.get("teacher_targets"):  # measured against the teacher logit cache: says how exact
            lines.append(f"  teacher: {ev['teacher_targets']}")
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
        ratio, body_ratio = eff.get("energy_ratio_snn_to_ann"), body.get("energy_ratio_snn_to_ann")
        if ratio is not None:
            lines.append(f"  {'energy SNN / ANN twin':<24}{ratio:>10.3f}  (body without the head: {body_ratio:.3f})")
        mm = eff.get("matmuls") or {}
        if mm and eff.get("snn_macs_per_token") is not None:
            on_spikes = [n for n, m in mm.items() if m["operand"] == "spikes"]
            lines.append(f"  weight matmuls reading spikes: {len(on_spikes)} of {len(mm)}")
            if eff.get("silent_matmuls"):
                lines.append(f"  WARNING: all-zero input (silent branch) into {', '.join(eff['silent_matmuls'])}")
        lines.append(f"  note: {eff.get('note', ENERGY_NOTE)}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Replies (--teacher-responses)
# ---------------------------------------------------------------------------------------------

ROUGE_MISSING = "ROUGE-L needs the rouge-score package: pip install 'snn-distill[responses]' (rouge-score==0.1.2)"


def rouge_l(predictions: Sequence[str], references: Sequence[str]) -> float | None:
    """Mean ROUGE-L F-measure of each prediction against its reference (Google's `rouge-score`, its
    default tokenizer: lower-cased alphanumeric words); None when the package is missing."""
    try:
        from rouge_score import rouge_scorer
    except ImportError:
        return None
    if not predictions:
        return 0.0
    logging.getLogger("absl").setLevel(logging.WARNING)  # rouge-score announces its default tokenizer
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    scores = [scorer.score(ref, pred)["rougeL"].fmeasure for pred, ref in zip(predictions, references)]
    return sum(scores) / len(scores)


def empty_share(texts: Sequence[str]) -> float:
    """Share of replies that are empty or whitespace only."""
    return sum(not t.strip() for t in texts) / len(texts) if texts else 0.0


@torch.inference_mode()
def response_agreement(
    student: torch.nn.Module | Callable[[torch.Tensor], torch.Tensor],
    blocks: Sequence[list[int]],
    reply_starts: Sequence[int],
    pad_id: int | None,
    device: torch.device | str = "cpu",
    batch_size: int | None = None,
) -> tuple[float, int]:
    """Teacher-forced top-1 agreement on the reply tokens: over the positions that predict a reply
    token (see `data.response_loss_mask`), the share where the student's argmax is the teacher's token.
    Returns (agreement, positions). batch_size None: as many blocks as keep the [B, S, V] logits
    near 64M entries."""
    from .data import pad_batch, response_loss_mask

    if batch_size is None:
        width = max((len(b) for b in blocks), default=1)
        vocab = getattr(getattr(student, "config", None), "vocab_size", 1 << 16)
        batch_size = max(1, (1 << 26) // max(1, width * vocab))
    agree = total = 0
    for i in range(0, len(blocks), batch_size):
        ids, mask = pad_batch(blocks[i : i + batch_size], pad_id)
        keep = response_loss_mask(reply_starts[i : i + batch_size], mask)
        ids, keep = ids.to(device), keep.to(device)
        pred = student(ids).argmax(-1)
        nxt = torch.roll(ids, -1, dims=1)
        agree += int(((pred == nxt) & keep).sum())
        total += int(keep.sum())
    return (agree / total if total else 0.0), total


def evaluate_responses(
    student: torch.nn.Module,
    prompts: Sequence[str],
    prompt_ids: Sequence[list[int]],
    teacher_texts: Sequence[str],
    blocks: Sequence[list[int]],
    reply_starts: Sequence[int],
    tokenizer: Any,
    *,
    stop_ids: Sequence[int],
    max_new_tokens: int,
    device: torch.device | str = "cpu",
    samples: int = 3,
) -> dict[str, Any]:
    """The `evaluation.responses` section: the student's greedy replies to held-out prompts against the
    teacher's. Greedy is plain argmax decoding (no min_tokens, no repetition penalty), so the empty
    share measures what the model itself predicts, not what the serving defaults patch over.

    `blocks`/`reply_starts`: prompt + teacher reply examples (`data.reply_blocks`) for the
    teacher-forced agreement; `samples`: how many prompts are stored side by side."""
    from .responses import student_continuations

    student_device = next(student.parameters()).device
    agreement, positions = response_agreement(student, blocks, reply_starts, tokenizer.pad_token_id, student_device)
    conts = student_continuations(
        student, prompt_ids, max_new_tokens, stop_ids, vocab_limit=len(tokenizer), device=student_device
    )
    texts = [tokenizer.decode(c.ids, skip_special_tokens=True) for c in conts]
    rouge = rouge_l(texts, teacher_texts)
    res: dict[str, Any] = {
        "prompts": len(prompts),
        "teacher_forced_agreement": agreement,
        "reply_positions": positions,
        "rouge_l": rouge,
        "empty_reply_share": empty_share(texts),
        "teacher_empty_reply_share": empty_share(teacher_texts),
        "mean_reply_tokens": sum(len(c.ids) for c in conts) / max(len(conts), 1),
        "decoding": f"greedy, at most {max_new_tokens} new tokens, no min_tokens or repetition penalty",
        "samples": [
            {"prompt": p, "teacher": t, "student": s} for p, t, s in list(zip(prompts, teacher_texts, texts))[:samples]
        ],
    }
    if rouge is None:
        res["rouge_l_note"] = ROUGE_MISSING
    return res


def _clip(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def responses_line(responses: dict[str, Any]) -> str:
    """The reply figures in one line (the CLI's and the demo's summaries)."""
    rouge = responses.get("rouge_l")
    return (
        f"teacher-forced agreement {responses['teacher_forced_agreement']:.3f}, ROUGE-L "
        f"{'-' if rouge is None else f'{rouge:.3f}'}, empty replies {responses['empty_reply_share']:.1%} "
        f"({responses.get('prompts', 0)} held-out prompts, greedy)"
    )


def format_responses(responses: dict[str, Any] | None, width: int = 48) -> str:
    """The reply figures and the side-by-side samples as plain text (for the training report)."""
    if not responses:
        return ""
    rouge = responses.get("rouge_l")
    lines = [
        f"replies on {responses.get('prompts', 0)} held-out prompts ({responses.get('decoding', 'greedy')})",
        f"  {'teacher-forced agreement':<28}{responses['teacher_forced_agreement']:>8.3f}",
        f"  {'ROUGE-L vs teacher':<28}{(f'{rouge:.3f}' if rouge is not None else '-'):>8}",
        f"  {'empty replies':<28}{responses['empty_reply_share'] * 100:>7.1f}%",
    ]
    if rouge is None:
        lines.append(f"  note: {ROUGE_MISSING}")
    for s in responses.get("samples", []):
        lines.append(f"  prompt : {_clip(s['prompt'], 2 * width)}")
        lines.append(f"    teacher | {_clip(s['teacher'], width):<{width}} | student | {_clip(s['student'], width)}")
    return "\n".join(lines)
