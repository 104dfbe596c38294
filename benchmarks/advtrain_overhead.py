"""Overhead of adversarial training: one FARE optimiser step vs (K + 1) plain forward+backward passes.

A FARE step costs one reference forward of the frozen encoder, K PGD steps (forward + input gradient)
and one training forward+backward plus the optimiser update. Its floor is therefore about (K + 1)
forward+backward passes of the tower on the same batch. This script measures, side by side in one run
(interleaved, several repeats, median):

  A  one FARE training step through the real trainer (``FareTrainer.training_step``, gradient clipping,
     AdamW step, scheduler step, zero_grad), PGD-K inside;
  B  one forward+backward of the same tower on the same batch (FARE loss, parameter gradients),

and reports ratio = median(A) / ((K + 1) * median(B)). Goal: <= 1.15. Absolute times are printed too
but only mean something on a GPU.

    python benchmarks/advtrain_overhead.py            # WorldCLIP-sized synthetic tower, batch 32
    python benchmarks/advtrain_overhead.py --quick    # under 2 minutes on 2 CPU cores
    python benchmarks/advtrain_overhead.py --model openai/clip-vit-large-patch14-336 --batch 32 --device cuda

The last line of output is one JSON object (see CONVENTIONS.md).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from transformers import CLIPVisionConfig, CLIPVisionModel

from adpo.losses.encoder import fare_loss
from adpo.testing import tiny_image_processor
from trainers.encoder_trainer import LoadedEncoder, build_tower_embedding, load_encoder_for_training
from trainers.fare import FareConfig, FareTrainer

GOAL = 1.15


def _synthetic_encoder() -> LoadedEncoder:
    # WorldCLIP's geometry (64 px, 16 px patches, width 256, 6 blocks). Much smaller towers are not
    # representative: the pixel-space work (normalisation, the patch convolution's input gradient) then
    # rivals the transformer's, whereas in CLIP ViT-L/14 it is negligible.
    config = CLIPVisionConfig(
        image_size=64, patch_size=16, hidden_size=256, intermediate_size=1024,
        num_hidden_layers=6, num_attention_heads=8, hidden_act="quick_gelu",
    )
    torch.manual_seed(0)
    return LoadedEncoder(CLIPVisionModel(config), tiny_image_processor(64), -2, "default",
                         {"base_model": "synthetic", "base_kind": "clip_vision_model"})


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small batch, few repeats (< 2 min on 2 CPU cores)")
    parser.add_argument("--model", default=None, help="encoder to time (CLIP / LVLM id or dir); default: synthetic")
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--steps", type=int, default=10, help="PGD steps K")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--embedding", default="pooled", choices=("pooled", "llm"))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads (1: OpenMP spin-waits on a shared machine would otherwise blur the CPU-time clock)")
    args = parser.parse_args(argv)
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    batch_size = args.batch or (8 if args.quick else 32)
    repeats = args.repeats or (5 if args.quick else 11)
    device = torch.device(args.device)

    with tempfile.TemporaryDirectory() as output_dir:
        config = FareConfig(
            model_name_or_path=args.model or "synthetic", dataset="unused", output_dir=output_dir,
            embedding=args.embedding, attack_steps=args.steps, per_device_train_batch_size=batch_size,
            max_steps=10_000, use_cpu=device.type == "cpu", report_to="none", disable_tqdm=True,
        )
        loaded = load_encoder_for_training(config) if args.model else _synthetic_encoder()
        model = build_tower_embedding(loaded, args.embedding)
        trainer = FareTrainer(model, config, image_processor=loaded.image_processor, source=loaded.source)
        trainer.create_optimizer_and_scheduler(num_training_steps=config.max_steps)
        trainer.current_gradient_accumulation_steps = 1  # set by Trainer.train() in a real run
        model = trainer.model
        size = loaded.encoder.config.image_size
        pixels = torch.rand(batch_size, 3, size, size, generator=torch.Generator().manual_seed(0)).to(device)
        inputs = {"pixel_values": pixels}
        with torch.no_grad():
            trainer.original.to(device)
            reference = trainer.original(pixels)

        def fare_step() -> None:
            trainer.training_step(model, inputs)
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
            trainer.optimizer.step()
            trainer.lr_scheduler.step()
            trainer.optimizer.zero_grad(set_to_none=True)

        def forward_backward() -> None:
            model.train()
            fare_loss(model(pixels), reference).backward()
            trainer.optimizer.zero_grad(set_to_none=True)

        # On a shared CPU, wall time measures the neighbours; the process's CPU time measures the work.
        clock = time.perf_counter if device.type == "cuda" else time.process_time

        def timed(function) -> float:
            _sync(device)
            start = clock()
            function()
            _sync(device)
            return clock() - start

        for _ in range(2):  # warm-up (allocator, optimiser state)
            fare_step()
            forward_backward()
        step_times, pass_times = [], []
        for repeat in range(repeats):
            step_times.append(timed(fare_step))
            pass_times.append(timed(forward_backward))
            print(f"repeat {repeat + 1}/{repeats}: FARE step {step_times[-1] * 1e3:.1f} ms, "
                  f"forward+backward {pass_times[-1] * 1e3:.1f} ms", file=sys.stderr)

    step, single = statistics.median(step_times), statistics.median(pass_times)
    ratio = step / ((args.steps + 1) * single)
    print(f"FARE step (PGD-{args.steps}) median {step * 1e3:.1f} ms; forward+backward median {single * 1e3:.1f} ms; "
          f"ratio to (K+1) passes {ratio:.3f} (goal <= {GOAL})")
    result = {
        "metric": "advtrain_overhead",
        "value": round(ratio, 4),
        "goal": f"<= {GOAL}",
        "unit": "ratio",
        "details": {
            "fare_step_ms": round(step * 1e3, 2),
            "forward_backward_ms": round(single * 1e3, 2),
            "pgd_steps": args.steps,
            "batch": batch_size,
            "repeats": repeats,
            "embedding": args.embedding,
            "model": args.model or f"synthetic CLIP ViT {loaded.encoder.config.num_hidden_layers}x{loaded.encoder.config.hidden_size} @{size}px",
            "device": str(device),
            "torch_threads": torch.get_num_threads(),
            "clock": "wall (perf_counter)" if device.type == "cuda" else "process CPU time",
        },
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
