"""Attack overhead: a K-step PGD / APGD versus K plain forward+backward passes of the same tower.

Both run on the same batch and the same objective (the FARE embedding distance), interleaved in one
process over several repeats; the metric is median(attack time) / (K × median(one forward+backward)),
the bookkeeping cost of the attack loop (projection, best-iterate tracking, early-stop logic).
Goal ≤ 1.10. Run: ``python benchmarks/attack_overhead.py [--quick]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from transformers import CLIPVisionModel

from adpo.attacks import apgd, pgd
from adpo.objectives import EmbeddingDistance
from adpo.testing import random_pixels, tiny_image_processor, tiny_vision_config
from adpo.threat import ThreatModel
from adpo.tower import VisionTower


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, under ~2 minutes on 2 CPU cores")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--batch", type=int, default=None)
    args = parser.parse_args()
    repeats = args.repeats or (3 if args.quick else 7)
    batch = args.batch or (16 if args.quick else 64)
    device = "cuda" if torch.cuda.is_available() else "cpu"

    # The bundled world's encoder geometry (64 px, patch 16, width 256, 6 layers), randomly initialised.
    config = tiny_vision_config(image_size=64, patch_size=16, hidden_size=256, layers=6)
    torch.manual_seed(0)
    tower = VisionTower.from_encoder(CLIPVisionModel(config).to(device).eval(), tiny_image_processor(64))
    x = random_pixels(batch, image_size=64).to(device)
    with torch.no_grad():
        reference = tower.pooled(x) + 0.1
    objective = EmbeddingDistance(tower.pooled, reference, modules=[tower])
    threat = ThreatModel("linf", 2 / 255, step_size=1 / 255)
    steps = args.steps

    def synchronize() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    def forward_backward() -> None:
        pixels = x.clone().requires_grad_(True)
        torch.autograd.grad(objective(pixels).sum(), pixels)

    def run_pgd() -> None:
        pgd(objective, x, threat, steps, generator=torch.Generator(device=device).manual_seed(0))

    def run_apgd() -> None:
        apgd(objective, x, threat, steps, generator=torch.Generator(device=device).manual_seed(0))

    def timed(fn) -> float:
        synchronize()
        start = time.perf_counter()
        fn()
        synchronize()
        return time.perf_counter() - start

    # Parameters frozen for the baseline as the attacks freeze them, so both compute the same gradients.
    for parameter in tower.parameters():
        parameter.requires_grad_(False)
    for fn in (forward_backward, run_pgd, run_apgd):  # warm-up
        fn()
    times: dict[str, list[float]] = {"fwd_bwd": [], "pgd": [], "apgd": []}
    for _ in range(repeats):
        times["fwd_bwd"].append(statistics.median(timed(forward_backward) for _ in range(steps)))
        times["pgd"].append(timed(run_pgd))
        times["apgd"].append(timed(run_apgd))
    one = statistics.median(times["fwd_bwd"])
    ratio_pgd = statistics.median(times["pgd"]) / (steps * one)
    ratio_apgd = statistics.median(times["apgd"]) / (steps * one)
    print(f"device={device} batch={batch} steps={steps} repeats={repeats}")
    print(f"one forward+backward: {one * 1e3:.2f} ms (median)")
    print(f"PGD-{steps}:  {statistics.median(times['pgd']) * 1e3:.1f} ms  ratio {ratio_pgd:.3f}")
    print(f"APGD-{steps}: {statistics.median(times['apgd']) * 1e3:.1f} ms  ratio {ratio_apgd:.3f}")
    result = {
        "metric": "attack_overhead",
        "value": round(max(ratio_pgd, ratio_apgd), 4),
        "goal": "<= 1.10",
        "unit": "ratio",
        "details": {
            "pgd_ratio": round(ratio_pgd, 4), "apgd_ratio": round(ratio_apgd, 4), "steps": steps, "batch": batch,
            "repeats": repeats, "device": device, "fwd_bwd_ms": round(one * 1e3, 3),
            "pgd_ms": round(statistics.median(times["pgd"]) * 1e3, 3), "apgd_ms": round(statistics.median(times["apgd"]) * 1e3, 3),
        },
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
