"""Peak memory of one AdPO training step vs TRL's DPOTrainer default, same model and batch.

TRL's DPOTrainer, given no ``ref_model``, loads a second full copy of the LVLM as the reference and
trains every parameter. AdPOTrainer trains only the vision tower and keeps, as its reference, a frozen
copy of the original tower on the shared frozen LLM + projector. Each variant builds its trainer from
the same saved model and runs one optimiser step on the same pairs batch, in its own subprocess:

  adpo           AdPOTrainer (full tower fine-tuning, PIO + AIO, reference forward on, no stored ref log-probs)
  trl_default    DPOTrainer(model, ref_model=None): second full model, all parameters trained
  trl_tower      DPOTrainer with only the reachable tower parameters trainable (freeze_for_tower_training),
                 still with its default second full model: isolates the saving of the shared reference

Peak memory counts everything resident during the step (policy, reference, gradients, optimiser
state, activations) above the process's footprint before the model is loaded: on CUDA
``torch.cuda.max_memory_allocated``; on CPU the peak RSS (VmHWM, reset after the trainer is built so
that loading transients do not count) minus the RSS before loading. Variants run interleaved, several repeats, median; ratio = adpo / trl_default (goal <= 0.65).

The model is LLaVA-shaped (a CLIP tower that is small next to its LLM, as ViT-L/14 is next to a 7B LLM);
the default keeps the tower at ~4% of the parameters, as in LLaVA-1.5-7B.

    python benchmarks/adpo_memory.py            # 3 repeats
    python benchmarks/adpo_memory.py --quick    # under 2 minutes on 2 CPU cores
    python benchmarks/adpo_memory.py --device cuda --text-hidden 2048 --text-layers 16

The last line of output is one JSON object (see CONVENTIONS.md).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

GOAL = 0.65
VARIANTS = ("adpo", "trl_default", "trl_tower")


def _rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _reset_peak_rss() -> bool:
    """Reset the kernel's resident-set high-water mark (Linux >= 4.0), so that loading transients
    (safetensors pages, init copies) do not count as the training step's peak."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        return True
    except OSError:
        return False


def _peak_rss_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# ----------------------------------------------------------------------------------------------------
# Set-up (parent process): one model, one batch of pairs, on disk
# ----------------------------------------------------------------------------------------------------
def prepare(workdir: Path, text_hidden: int, text_layers: int, batch: int) -> dict:
    import torch
    from datasets import Dataset, Features, Image as ImageFeature, Value

    from adpo.tower import find_vision_tower
    from adpo.preprocess import to_uint8_images
    from adpo.testing import random_pixels, tiny_llava, tiny_vision_config

    vision = tiny_vision_config(image_size=64, patch_size=16, hidden_size=256, layers=6)  # WorldCLIP geometry
    model, processor = tiny_llava(seed=0, text_hidden_size=text_hidden, text_layers=text_layers, vision_config=vision)
    model.save_pretrained(workdir / "model")
    processor.save_pretrained(workdir / "model")
    clean = random_pixels(batch, 64, seed=0)
    adv = (clean + (torch.rand(clean.shape, generator=torch.Generator().manual_seed(1)) * 2 - 1) * 4 / 255).clamp(0, 1)
    questions = ["what is in the image ?", "describe this picture", "what color ?", "what shape ?"]
    chosen = ["a red circle on the left", "two small objects", "blue", "a large square"]
    rejected = ["a green star", "three triangle objects on the right", "yellow", "no"]
    rows = {
        "image": to_uint8_images(clean),
        "adv_image": to_uint8_images(adv),
        "prompt": [questions[i % 4] for i in range(batch)],
        "chosen": [chosen[i % 4] for i in range(batch)],
        "rejected": [rejected[i % 4] for i in range(batch)],
    }
    Dataset.from_dict(rows, features=Features({
        "image": ImageFeature(), "adv_image": ImageFeature(), "prompt": Value("string"),
        "chosen": Value("string"), "rejected": Value("string"),
    })).save_to_disk(str(workdir / "pairs"))
    total = sum(p.numel() for p in model.parameters())
    tower = sum(p.numel() for p in find_vision_tower(model).parameters())
    return {"parameters": total, "tower_parameters": tower, "tower_share": tower / total}


# ----------------------------------------------------------------------------------------------------
# One variant (child process)
# ----------------------------------------------------------------------------------------------------
def worker(variant: str, workdir: Path, device: str, batch: int) -> dict:
    import gc

    import torch
    from datasets import load_from_disk
    from transformers import LlavaForConditionalGeneration, LlavaProcessor
    from trl import DPOConfig, DPOTrainer

    from adpo.tower import freeze_for_tower_training
    from trainers.adpo import AdPOConfig, AdPOTrainer

    common = dict(
        output_dir=str(workdir / f"out-{variant}"), per_device_train_batch_size=batch, max_steps=1,
        learning_rate=1e-5, bf16=False, gradient_checkpointing=False, report_to=[], save_strategy="no",
        logging_steps=1, use_cpu=device == "cpu", disable_tqdm=True, seed=0, dataloader_num_workers=0,
    )
    pairs = load_from_disk(str(workdir / "pairs"))
    gc.collect()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    baseline = _rss_bytes()

    model = LlavaForConditionalGeneration.from_pretrained(str(workdir / "model"), dtype=torch.float32)
    processor = LlavaProcessor.from_pretrained(str(workdir / "model"))
    if variant == "adpo":
        trainer = AdPOTrainer(model, AdPOConfig(**common), pairs, processor)
    else:
        if variant == "trl_tower":
            freeze_for_tower_training(model, processor)
        # TRL's vision format: conversational prompt with an image placeholder, one image per pair.
        conversational = pairs.map(lambda row: {
            "prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": row["prompt"]}]}],
            "chosen": [{"role": "assistant", "content": [{"type": "text", "text": row["chosen"]}]}],
            "rejected": [{"role": "assistant", "content": [{"type": "text", "text": row["rejected"]}]}],
        }, remove_columns=["adv_image"])
        trainer = DPOTrainer(model, args=DPOConfig(**common), train_dataset=conversational, processing_class=processor)
    gc.collect()
    reset = device == "cpu" and _reset_peak_rss()
    trainer.train()
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = _peak_rss_bytes() - baseline
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    return {"variant": variant, "peak_bytes": int(peak), "trainable_parameters": trainable, "peak_reset": reset,
            "reference": type(trainer.ref_model).__name__ if trainer.ref_model is not None else None}


def run_worker(variant: str, workdir: Path, device: str, batch: int) -> dict:
    command = [sys.executable, __file__, "--worker", variant, "--workdir", str(workdir), "--device", device,
               "--batch", str(batch)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "TQDM_DISABLE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise RuntimeError(f"variant {variant} failed:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one repeat, shallower LLM (under 2 minutes on 2 CPU cores)")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--batch", type=int, default=4, help="pairs per step")
    parser.add_argument("--text-hidden", type=int, default=1024, help="LLM width")
    parser.add_argument("--text-layers", type=int, default=None, help="LLM depth (default 10: tower ~4%% of the parameters, as in LLaVA-1.5-7B; --quick 6)")
    parser.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    import torch

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.worker:
        print(json.dumps(worker(args.worker, Path(args.workdir), device, args.batch)))
        return 0

    repeats = args.repeats or (1 if args.quick else 3)
    text_hidden = args.text_hidden
    text_layers = args.text_layers or (6 if args.quick else 10)
    with tempfile.TemporaryDirectory(prefix="adpo_memory_") as tmp:
        workdir = Path(tmp)
        shape = prepare(workdir, text_hidden, text_layers, args.batch)
        print(f"model: {shape['parameters']:,} parameters, tower {shape['tower_parameters']:,} "
              f"({100 * shape['tower_share']:.1f}%); batch {args.batch} pairs; device {device}", flush=True)
        samples: dict[str, list[int]] = {v: [] for v in VARIANTS}
        info: dict[str, dict] = {}
        for repeat in range(repeats):
            for variant in VARIANTS:  # interleaved
                result = run_worker(variant, workdir, device, args.batch)
                samples[variant].append(result["peak_bytes"])
                info[variant] = result
                print(f"repeat {repeat + 1}/{repeats} {variant:12s} peak {result['peak_bytes'] / 2**20:8.1f} MiB "
                      f"(trainable {result['trainable_parameters']:,}, reference {result['reference']})", flush=True)
    median = {v: statistics.median(s) for v, s in samples.items()}
    ratio = median["adpo"] / median["trl_default"]
    ratio_tower = median["adpo"] / median["trl_tower"]
    print("median peak MiB: " + ", ".join(f"{v} {m / 2**20:.1f}" for v, m in median.items()))
    print(f"adpo / trl_default = {ratio:.3f} (goal <= {GOAL}); adpo / trl_tower-only = {ratio_tower:.3f}")
    summary = {
        "metric": "adpo_memory",
        "value": round(ratio, 4),
        "goal": f"<= {GOAL}",
        "unit": "ratio",
        "details": {
            "device": device,
            "measure": "cuda max_memory_allocated" if device == "cuda" else "peak RSS during train() minus RSS before loading",
            "repeats": repeats,
            "batch_pairs": args.batch,
            "model_parameters": shape["parameters"],
            "tower_parameters": shape["tower_parameters"],
            "median_peak_mib": {v: round(m / 2**20, 1) for v, m in median.items()},
            "ratio_vs_trl_tower_only": round(ratio_tower, 4),
            "samples_mib": {v: [round(x / 2**20, 1) for x in s] for v, s in samples.items()},
        },
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
