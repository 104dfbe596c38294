"""Throughput of the batched evaluation protocol against a batch-1 per-sample loop (the reference codes' way).

Both sides run the same protocol (`adpo.eval.protocol.run_protocol`: clean pass, APGD passes, generation,
scoring) with the same attack strength (steps, epsilon, passes, precision schedule, per-sample early stop) on
the same samples; only the batch size differs: the batched side holds every sample with all its attack passes
(answer + targets side by side) in one batch, the other side attacks one (sample, pass) row at a time. Runs
are interleaved (A B, B A, ...) and the medians compared.

    python benchmarks/eval_throughput.py --quick            # tiny random LLaVA, < 2 min on 2 CPU cores
    python benchmarks/eval_throughput.py --model world:small

With the tiny random LLaVA the VQA references are the model's own complete clean answers (clean accuracy
100 %), so every sample is attacked. The last output line is one JSON object (see shared CONVENTIONS.md).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from adpo.eval.config import EvalConfig  # noqa: E402
from adpo.eval.adapters import GenerativeModel  # noqa: E402
from adpo.eval.protocol import run_protocol  # noqa: E402
from adpo.eval.tasks import Sample  # noqa: E402

QUESTION = "what is in the image ?"


def tiny_setup(num_samples: int, max_new_tokens: int, seed: int):
    """A tiny random LLaVA and samples whose references are its complete greedy answers."""
    from adpo.lvlm import LlavaView
    from adpo.testing import random_pixels, tiny_llava

    model, processor = tiny_llava(seed=seed)
    view = LlavaView(model, processor)
    kept_pixels, kept_answers = [], []
    attempt = 0
    while len(kept_answers) < num_samples and attempt < 20:
        pool = random_pixels(64, seed=seed + 1 + attempt)
        answers = view.generate(pool, [QUESTION] * len(pool), max_new_tokens=max_new_tokens)
        encoded = view.encode([QUESTION] * len(pool), answers)
        complete = view.answer_scores(pool, encoded.input_ids, encoded.attention_mask, encoded.labels).all_greedy
        for i in complete.nonzero().flatten().tolist():
            kept_pixels.append(pool[i])
            kept_answers.append(answers[i])
        attempt += 1
    kept_pixels, kept_answers = kept_pixels[:num_samples], kept_answers[:num_samples]
    samples = [Sample(f"tiny-{i}", None, QUESTION, [a]) for i, a in enumerate(kept_answers)]
    return GenerativeModel(view, max_new_tokens), samples, torch.stack(kept_pixels), "tiny random LLaVA (adpo.testing.tiny_llava)"


def model_setup(model_name: str, num_samples: int, data: str):
    from adpo.eval.loading import prepare

    config = EvalConfig(model=model_name, task="vqa", data=data, num_samples=num_samples, progress=False)
    model, samples, pixels, _ = prepare(config)
    return model, samples, pixels, model_name


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small run (< 2 min on 2 CPU cores)")
    parser.add_argument("--model", default="tiny", help="'tiny' (random LLaVA) or any adpo eval model, e.g. world:small")
    parser.add_argument("--data", default="world:test", help="VQA source for non-tiny models")
    parser.add_argument("--samples", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--eps", default="1/255")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--precision-schedule", nargs="+", default=None)
    parser.add_argument("--vqa-targets", nargs="*", default=None, help="targeted VQA passes (default: none in --quick, Maybe otherwise)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads on CPU (default 1: on a shared CPU more threads oversubscribe and time noise, not compute)")
    args = parser.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)

    samples_n = args.samples or (16 if args.quick else 32)
    steps = args.steps or (20 if args.quick else 100)
    repeats = args.repeats or (3 if args.quick else 5)
    schedule = args.precision_schedule or (["float32"] if args.quick else ["half", "float32"])
    # "maybe" is in the tiny model's vocabulary; real models get the protocol's "Maybe".
    targets = args.vqa_targets if args.vqa_targets is not None else ([] if args.quick else ["maybe" if args.model == "tiny" else "Maybe"])
    max_new_tokens = 8
    batch_size = args.batch_size or samples_n * (1 + len(targets))  # every (sample, pass) row at once

    if args.model == "tiny":
        model, samples, pixels, description = tiny_setup(samples_n, max_new_tokens, args.seed)
    else:
        model, samples, pixels, description = model_setup(args.model, samples_n, args.data)
    base = EvalConfig(model=description, task="vqa", eps=[args.eps], steps=steps, precision_schedule=schedule, vqa_targets=targets,
                      step_check_steps=0, num_examples=0, progress=False, seed=args.seed, max_new_tokens=max_new_tokens)
    sides = {"batched": dataclasses.replace(base, batch_size=batch_size), "batch1": dataclasses.replace(base, batch_size=1)}

    # Warm-up (allocator, lazy imports) on two samples, not timed.
    for config in sides.values():
        run_protocol(config, model, samples[:2], pixels[:2], write=False)

    # On a CPU the process's CPU time is the compute both sides spend (other jobs on a shared machine inflate
    # wall time unevenly); on a GPU wall time is what counts.
    on_cpu = model.device.type == "cpu"
    clock = time.process_time if on_cpu else time.perf_counter
    times: dict[str, list[float]] = {name: [] for name in sides}
    wall: dict[str, list[float]] = {name: [] for name in sides}
    results: dict[str, dict] = {}
    for repeat in range(repeats):
        order = list(sides) if repeat % 2 == 0 else list(sides)[::-1]
        for name in order:
            start, start_wall = clock(), time.perf_counter()
            report = run_protocol(sides[name], model, samples, pixels, write=False)
            times[name].append(clock() - start)
            wall[name].append(time.perf_counter() - start_wall)
            results[name] = report
            print(f"repeat {repeat} {name:8s} {times[name][-1]:7.2f} s ({'cpu' if on_cpu else 'wall'}), {wall[name][-1]:7.2f} s wall, "
                  f"robust={report['robust'][0]['metrics']['exact_match']:.3f}", flush=True)

    median = {name: statistics.median(values) for name, values in times.items()}
    median_wall = {name: statistics.median(values) for name, values in wall.items()}
    ratio = median["batch1"] / median["batched"]
    details = {
        "model": description,
        "device": str(model.device),
        "torch_threads": torch.get_num_threads(),
        "samples": len(samples),
        "steps": steps,
        "eps": args.eps,
        "precision_schedule": schedule,
        "vqa_targets": targets,
        "batch_size": batch_size,
        "repeats": repeats,
        "clock": "process CPU time" if on_cpu else "wall time",
        "median_seconds_batched": round(median["batched"], 3),
        "median_seconds_batch1": round(median["batch1"], 3),
        "median_wall_seconds_batched": round(median_wall["batched"], 3),
        "median_wall_seconds_batch1": round(median_wall["batch1"], 3),
        "wall_ratio": round(median_wall["batch1"] / median_wall["batched"], 3),
        "samples_per_second_batched": round(len(samples) / median["batched"], 3),
        "samples_per_second_batch1": round(len(samples) / median["batch1"], 3),
        "clean_accuracy": results["batched"]["clean"]["exact_match"],
        "robust_accuracy_batched": results["batched"]["robust"][0]["metrics"]["exact_match"],
        "robust_accuracy_batch1": results["batch1"]["robust"][0]["metrics"]["exact_match"],
        "gradient_steps_batched": results["batched"]["robust"][0]["gradient_steps"],
        "gradient_steps_batch1": results["batch1"]["robust"][0]["gradient_steps"],
        "note": "absolute times are only meaningful on a GPU; the ratio is the metric",
    }
    print(f"median batched {median['batched']:.2f} s, batch-1 {median['batch1']:.2f} s, speedup {ratio:.2f}x "
          f"(wall: {median_wall['batched']:.2f} s vs {median_wall['batch1']:.2f} s)")
    print(json.dumps({"metric": "eval_throughput_speedup", "value": round(ratio, 3), "goal": ">= 4", "unit": "ratio", "details": details}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
