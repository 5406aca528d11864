#!/usr/bin/env python
"""Replies of trained students against the teacher's, on the same held-out prompts: one row per run.

    python bench/bench_replies.py --teacher-model .cache/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf \
        --artifacts artifacts/prompts_only artifacts/replies [--max-texts 192 --reply-tokens 24 --max-length 96]

Every student is measured with `evaluate_responses` on the held-out prompts of the synthetic set
(the split of `--max-texts`, `--held-out-fraction` and `--seed`, as in training) against the teacher's
greedy replies (from the reply cache, generated there when missing): teacher-forced top-1 agreement
on the reply tokens, ROUGE-L of the student's greedy reply, and the share of empty replies. A student
trained on prompts only is measured the same way, so the rows compare the two kinds of training.
Pass the flags the replies were distilled with (the defaults are the demo's).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from snn_distill.artifacts import load_student  # noqa: E402
from snn_distill.config import TrainConfig  # noqa: E402
from snn_distill.data import load_texts, split_held_out  # noqa: E402
from snn_distill.evaluate import evaluate_responses  # noqa: E402
from snn_distill.responses import reply_data  # noqa: E402
from snn_distill.teacher import load_teacher  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--teacher-model", required=True)
    p.add_argument("--artifacts", nargs="+", required=True, help="folders holding student.pt + metadata.json")
    p.add_argument("--dataset", default="synthetic")
    p.add_argument("--max-texts", type=int, default=192)
    p.add_argument("--reply-tokens", type=int, default=24)
    p.add_argument("--max-length", type=int, default=96)
    p.add_argument("--held-out-fraction", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--teacher-cache", default=str(ROOT / ".cache" / "teacher"), help="its responses/ holds the replies")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="[bench] %(message)s", stream=sys.stderr)

    cfg = TrainConfig(
        teacher_model=args.teacher_model,
        dataset=args.dataset,
        max_texts=args.max_texts,
        max_length=args.max_length,
        held_out_fraction=args.held_out_fraction,
        seed=args.seed,
        teacher_responses=True,
        response_max_new_tokens=args.reply_tokens,
        teacher_cache=args.teacher_cache,
    )
    teacher = load_teacher(args.teacher_model, load_model=False)  # weights only if a reply is missing
    texts = load_texts(cfg.dataset, max_texts=cfg.max_texts)
    train_texts, held_texts = split_held_out(texts, cfg.held_out_fraction, cfg.seed)
    data = reply_data(cfg, teacher, train_texts, held_texts, "float32")  # the CPU teacher's dtype
    h = data.held
    print(f"{len(h.prompts)} held-out prompts, teacher replies of at most {args.reply_tokens} tokens (greedy)\n")
    print("| run | steps | trained on | teacher-forced agreement | ROUGE-L | empty replies |")
    print("|---|---:|---|---:|---:|---:|")
    for folder in args.artifacts:
        student, meta = load_student(Path(folder) / "student.pt")
        r = evaluate_responses(
            student,
            h.prompts,
            h.prompt_ids,
            [x.text for x in h.replies],
            data.held_blocks,
            data.held_starts,
            teacher.tokenizer,
            stop_ids=data.stop_ids,
            max_new_tokens=args.reply_tokens,
        )
        kind = "prompts + replies" if (meta.get("config") or {}).get("teacher_responses") else "prompts only"
        rouge = "-" if r["rouge_l"] is None else f"{r['rouge_l']:.3f}"
        print(
            f"| {folder} | {meta['training_results']['steps']} | {kind} | {r['teacher_forced_agreement']:.3f} | "
            f"{rouge} | {r['empty_reply_share']:.1%} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
