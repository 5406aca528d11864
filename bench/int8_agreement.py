#!/usr/bin/env python
"""How much of an exported student's behaviour its int8 file keeps, on more text than the export checks.

    python bench/int8_agreement.py --artifacts DIR [DIR ...] [--texts 64] [--first 300]

Each DIR holds `student.onnx` and `student.int8.onnx` (`snn-distill export --quantize int8`) and the
tokenizer files saved beside the student. The texts are the built-in synthetic prompts from index
`--first` on (the demo trains on the first 192), each scored whole by both full graphs in ONNX Runtime.
Prints a Markdown row per folder: top-1 agreement of int8 with fp32 over every position, mean
KL(fp32 || int8), and what the export reported on its five sample sentences.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def agreement(folder: Path, texts: list[str]) -> dict[str, float]:
    """Top-1 agreement and mean KL(fp32 || int8) over every position of `texts`, each scored whole."""
    import numpy as np
    import onnxruntime as ort

    from snn_distill.export.onnx import logit_agreement
    from snn_distill.tokenizer import resolve_tokenizer

    tok, _ = resolve_tokenizer(None, folder, None, strict=True)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    fp32, int8 = (ort.InferenceSession(str(folder / f), so, providers=["CPUExecutionProvider"])
                  for f in ("student.onnx", "student.int8.onnx"))  # fmt: skip
    a, b = [], []
    for text in texts:
        ids = np.array([tok.encode(text)], dtype=np.int64)
        a.append(fp32.run(["logits"], {"input_ids": ids})[0][0].astype(np.float64))
        b.append(int8.run(["logits"], {"input_ids": ids})[0][0].astype(np.float64))
    return {"positions": sum(len(x) for x in a), **logit_agreement(np.concatenate(a), np.concatenate(b))}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--artifacts", nargs="+", required=True, help="exported student folders")
    p.add_argument("--texts", type=int, default=64, help="how many prompts")
    p.add_argument("--first", type=int, default=300, help="index of the first prompt (past the demo's 192)")
    args = p.parse_args(argv)

    from snn_distill.data import synthetic_prompts

    texts = synthetic_prompts()[args.first : args.first + args.texts]
    print(f"`python bench/int8_agreement.py {' '.join(sys.argv[1:] if argv is None else argv)}`\n")
    print("| student | qat | int8 MB | exact spike matmuls | positions | top-1 agreement | mean KL "
          "| export's sample: agreement / KL |")
    print("|---|---|---:|---:|---:|---:|---:|---|")
    for d in map(Path, args.artifacts):
        meta = json.loads((d / "metadata.json").read_text())
        exp = meta.get("export", {})
        r = agreement(d, texts)
        print(f"| {d.name} | {meta['architecture'].get('qat_int8', False)} | {exp.get('int8_size_mb')} | "
              f"{exp.get('int8_exact_spike_matmuls', '-')} | {r['positions']} | {r['top1_agreement']:.3f} | "
              f"{r['mean_kl']:.4f} | {exp.get('int8_top1_agreement')} / {exp.get('int8_mean_kl')} |")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
