"""Cost of online preference pairs: one AdPO step that makes its pairs vs one step on stored pairs, same batch.

  A  online  (``pair_source: online``): PGD-K on the FARE objective against the current tower, the policy's
     greedy answers on x and on x_adv (one batched ``generate``), then PIO + λ·AIO with the reference forward;
  B  stored  (``pair_source: stored``): the same images, adversarial images and answers read from a pairs
     batch (with stored reference log-probs unless ``--no-stored-ref-logps``, as ``adpo pairs`` writes them),
     then PIO + λ·AIO.

Both are whole optimiser steps through the real trainer (``training_step``, gradient clipping, AdamW, scheduler,
zero_grad) on one batch, interleaved, several repeats, median; ratio = median(A) / median(B). The stored batch is
the online trainer's own first pairs, so both score answers of the same length. The learning rate is tiny so
the answers, hence the work, stay the same across repeats. Also reported: the generation's share of the online
step (``online/generation_share``, as the trainer logs it). No goal yet.

    python benchmarks/adpo_online_cost.py              # tiny LLaVA (64 px tower, 4-layer LM), batch 8
    python benchmarks/adpo_online_cost.py --quick      # under 2 minutes on 2 CPU cores
    python benchmarks/adpo_online_cost.py --model world:small --batch 4

Absolute times are printed too but only mean something on a GPU. The last line of output is one JSON
object (see CONVENTIONS.md).
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
from datasets import Dataset

TINY_PROMPT = "what is in the image ?"  # the tiny tokenizer's lower-case vocabulary
PAPER_PROMPT = "What is in the image?"


def _load(model_name: str | None):
    if model_name:
        from adpo.models import load_lvlm

        model, processor = load_lvlm(model_name, dtype="float32")
        return model, processor, PAPER_PROMPT
    from adpo.testing import tiny_llava, tiny_vision_config

    vision = tiny_vision_config(image_size=64, patch_size=16, hidden_size=64, layers=4)
    model, processor = tiny_llava(seed=0, text_hidden_size=128, text_layers=4, vision_config=vision)
    return model, processor, TINY_PROMPT


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small batch, few repeats (< 2 min on 2 CPU cores)")
    parser.add_argument("--model", default=None, help="LVLM to time (hub id, directory, world:small); default: tiny random LLaVA")
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--attack-steps", type=int, default=10)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--no-stored-ref-logps", dest="stored_ref_logps", action="store_false",
                        help="the stored step runs the reference forward too")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads (1: OpenMP spin-waits on a shared machine would otherwise blur the CPU-time clock)")
    args = parser.parse_args(argv)
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    batch_size = args.batch or (4 if args.quick else 8)
    repeats = args.repeats or (5 if args.quick else 11)
    device = torch.device(args.device)

    from adpo.lvlm import LlavaView
    from adpo.preprocess import to_pixels, to_uint8_images
    from adpo.testing import random_pixels
    from trainers.adpo import AdPOConfig, AdPOTrainer

    with tempfile.TemporaryDirectory() as output_dir:
        common = dict(
            output_dir=output_dir, per_device_train_batch_size=batch_size, max_steps=10_000, learning_rate=1e-9,
            bf16=False, gradient_checkpointing=False, report_to=[], save_strategy="no", disable_tqdm=True,
            use_cpu=device.type == "cpu", seed=0, attack_steps=args.attack_steps, attack_eps="4/255",
        )
        online_model, processor, prompt = _load(args.model)
        size = processor.image_processor.crop_size["height"]
        images = to_uint8_images(random_pixels(batch_size, size, seed=0))
        prompts = [prompt] * batch_size
        online = AdPOTrainer(
            online_model, AdPOConfig(**common, pair_source="online", max_new_tokens=args.max_new_tokens),
            Dataset.from_dict({"image": images, "prompt": prompts}), processor,
        )
        online_inputs = online._prepare_inputs(online.data_collator([{"image": im, "prompt": prompt} for im in images]))
        online.model.train()
        online.compute_loss(online.model, online_inputs)  # the pairs the stored step will read
        made = online.online_pairs

        stored_model, _, _ = _load(args.model)
        columns = {"image": images, "adv_image": to_uint8_images(made.adv_pixels.cpu()), "prompt": prompts,
                   "chosen": made.chosen, "rejected": made.rejected}
        if args.stored_ref_logps:  # what `adpo pairs --compute_ref_logps` stores: the original model's scores
            view = LlavaView(stored_model.to(device), processor)
            clean, adv = (to_pixels(columns[key], processor).to(device) for key in ("image", "adv_image"))
            encoded = view.encode(prompts * 2, made.chosen + made.rejected)
            with torch.no_grad():
                scores = view.answer_scores(torch.cat([clean, adv]), encoded.input_ids, encoded.attention_mask,
                                            encoded.labels).sum_logps.tolist()
            columns["ref_chosen_logps"], columns["ref_rejected_logps"] = scores[:batch_size], scores[batch_size:]
        pairs = Dataset.from_dict(columns)
        stored = AdPOTrainer(stored_model, AdPOConfig(**common), pairs, processor)
        stored_inputs = stored._prepare_inputs(stored.data_collator([pairs[i] for i in range(batch_size)]))

        for trainer in (online, stored):
            trainer.create_optimizer_and_scheduler(num_training_steps=common["max_steps"])
            trainer.current_gradient_accumulation_steps = 1  # set by Trainer.train() in a real run

        def step(trainer: AdPOTrainer, inputs: dict) -> None:
            trainer.training_step(trainer.model, inputs)
            torch.nn.utils.clip_grad_norm_(trainer.model.parameters(), trainer.args.max_grad_norm)
            trainer.optimizer.step()
            trainer.lr_scheduler.step()
            trainer.optimizer.zero_grad(set_to_none=True)

        # On a shared CPU, wall time measures the neighbours; the process's CPU time measures the work.
        clock = time.perf_counter if device.type == "cuda" else time.process_time

        def timed(trainer: AdPOTrainer, inputs: dict) -> float:
            _sync(device)
            start = clock()
            step(trainer, inputs)
            _sync(device)
            return clock() - start

        for _ in range(2):  # warm-up (allocator, optimiser state)
            step(online, online_inputs)
            step(stored, stored_inputs)
        online._metrics["train"].clear()
        online_times, stored_times = [], []
        for repeat in range(repeats):
            online_times.append(timed(online, online_inputs))
            stored_times.append(timed(stored, stored_inputs))
            print(f"repeat {repeat + 1}/{repeats}: online step {online_times[-1] * 1e3:.1f} ms, "
                  f"stored step {stored_times[-1] * 1e3:.1f} ms", file=sys.stderr)
        generation_share = statistics.median(online._metrics["train"]["online/generation_share"])
        identical_rate = statistics.mean(online._metrics["train"]["online/identical_rate"])

    online_ms, stored_ms = statistics.median(online_times) * 1e3, statistics.median(stored_times) * 1e3
    ratio = online_ms / stored_ms
    print(f"online-pairs step median {online_ms:.1f} ms; stored-pairs step median {stored_ms:.1f} ms; ratio {ratio:.2f}; "
          f"generation {generation_share:.0%} of the online step")
    result = {
        "metric": "adpo_online_step_ratio",
        "value": round(ratio, 3),
        "goal": None,
        "unit": "ratio",
        "details": {
            "online_step_ms": round(online_ms, 2),
            "stored_step_ms": round(stored_ms, 2),
            "generation_share": round(generation_share, 3),
            "identical_rate": round(identical_rate, 3),
            "batch": batch_size,
            "attack_steps": args.attack_steps,
            "max_new_tokens": args.max_new_tokens,
            "answer_words": [len(answer.split()) for answer in made.chosen + made.rejected],
            "stored_ref_logps": args.stored_ref_logps,
            "repeats": repeats,
            "model": args.model or "tiny random LLaVA (64 px 4-layer tower, 4-layer 128-wide LM)",
            "device": str(device),
            "clock": "process CPU time" if device.type == "cpu" else "wall",
            "torch_threads": torch.get_num_threads(),
        },
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
