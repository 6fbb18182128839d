"""Does the pretrained toy pipeline draw what prompts ask? The judge reads generated samples.

    nice -n 15 python tools/toy_check.py --model models/tiny-toy --out docs/toy/prompt_check.json

For every class x context prompt ("a cup in the snow") it generates `--seeds` images (PNDM, `--steps`,
classifier-free guidance `--guidance`) and reports how often the judge reads the prompt's class and
context (chance: 1/5 each) and the judge's prompt fidelity (the CLIP-T analogue). The judge was trained on
renders only; this only uses it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hollow_export.toy import judge as toy_judge  # noqa: E402
from hollow_export.toy import world  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", type=Path, default=Path("models/tiny-toy"))
    p.add_argument("--out", type=Path, default=Path("docs/toy/prompt_check.json"))
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=4.0)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(args.model, local_files_only=True, safety_checker=None,
                                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    judge = toy_judge.Judge.load()
    t0 = time.time()
    rows = []
    for cls in world.CLASSES:
        for context in world.CONTEXTS:
            prompt = world.class_prompt(cls, context)
            gens = [torch.Generator().manual_seed(s) for s in range(args.seeds)]
            images = pipe([prompt] * args.seeds, num_inference_steps=args.steps, guidance_scale=args.guidance,
                          generator=gens, output_type="np").images
            images = (np.clip(images, 0, 1) * 255).round().astype(np.uint8)
            preds = judge.predict(images)
            fid = judge.prompt_fidelity(images, prompt)
            rows.append({"prompt": prompt, "cls_hit": float(np.mean([q["cls"] == cls for q in preds])),
                         "context_hit": float(np.mean([q["context"] == context for q in preds])),
                         "fidelity": fid["score"], "read": [q["cls"] + "/" + q["context"] for q in preds]})
            print(f"{prompt:28s} class {rows[-1]['cls_hit']:.2f} context {rows[-1]['context_hit']:.2f} "
                  f"fidelity {fid['score']:.3f}  read {rows[-1]['read']}", flush=True)
    summary = {
        "model": str(args.model), "seeds": args.seeds, "steps": args.steps, "guidance": args.guidance,
        "class_accuracy": float(np.mean([r["cls_hit"] for r in rows])),
        "context_accuracy": float(np.mean([r["context_hit"] for r in rows])),
        "prompt_fidelity": float(np.mean([r["fidelity"] for r in rows])),
        "chance": {"class": 1 / len(world.CLASSES), "context": 1 / len(world.CONTEXTS)},
        "seconds": round(time.time() - t0, 1), "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=1) + "\n")
    print(f"class read {summary['class_accuracy']:.2f}, context read {summary['context_accuracy']:.2f} "
          f"(chance 0.20 each); prompt fidelity {summary['prompt_fidelity']:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
