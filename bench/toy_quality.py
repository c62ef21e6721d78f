"""The full quality gate of the shipped toy model (CPU, ~1 minute).

    python bench/toy_quality.py [--model models/toy] [--steps 25] [--guidance 5.0] [--seed 0]

Generates one latent video for each of the 96 held-out prompts (32 attribute combinations × 3 phrasings never
seen in training) with CogVideoXPipeline (CFG, DDIM, no VAE), reads colour, shape and motion back with
`lowmem_eraser.toy.world.detect`, prints per-attribute accuracy and exits 1 if any attribute is below 90 %.
"""

import argparse
import sys
from pathlib import Path

from lowmem_eraser.toy.build import GATE_STEPS, GUIDANCE_SCALE, format_gate, quality_gate


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(Path(__file__).resolve().parents[1] / "models" / "toy"))
    parser.add_argument("--steps", type=int, default=GATE_STEPS)
    parser.add_argument("--guidance", type=float, default=GUIDANCE_SCALE)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    result = quality_gate(args.model, seed=args.seed, num_inference_steps=args.steps, guidance_scale=args.guidance)
    print(format_gate(result))
    for prompt, found in result["misses"]:
        print(f"  miss: {prompt!r} -> {found}")
    passed = all(result[key] >= 0.9 for key in ("colour", "shape", "motion"))
    print("quality gate:", "PASSED" if passed else "FAILED")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
