"""Real-geometry conformance suite (issue 24): every stage of adpo on random-weight stand-ins of LLaVA-1.5.

Builds llava-hf-style model directories from exact configs, with random weights, and runs the stages through
their real entry point (the ``adpo`` CLI, one process per stage):

  pairs (image folder, pad_to_square) -> train adpo (stored pairs) -> train adpo (pair_source: online)
  -> train fare -> train tecoa -> train fare on the 224 px tower -> transfer (into a Mistral-LM target)
  -> eval (VQA, APGD)

then checks what issue 24 asks for: prompt ids equal the processor's (BOS included); answer labels end with the
end-of-turn token; only tower tensors change in training and the saved encoders are float32; the grafted target's
non-tower tensors are bit-identical to the target's; the evaluation's attack took at least one gradient step on
every clean-correct sample and robust <= clean. It prints stage -> seconds -> peak RSS, writes
OUT/conformance.json and exits 0 only when every stage ran and every check holds.

The stand-ins (OUT/models):

* ``llava15-7b-geometry``: CLIP ViT-L/14-336 (hidden 1024, 24 layers, 16 heads, patch 14, 336 px, quick_gelu;
  feature layer -2, strategy ``default``: 576 image tokens) + a Llama LM, llava-hf's LLaVA-1.5 chat template and a
  Llama-2-style tokenizer (BPE with byte fallback, adds <s>; ``adpo.testing.template_tokenizer('llava15')``);
* ``llava15-224-geometry``: the same tower at 224 px (ViT-L/14: 256 image tokens);
* ``mistral-target``: a larger LVLM with a Mistral LM and a Mistral-instruct template, same 336 px tower geometry
  (what ``adpo transfer`` grafts into);
* ``clip-vit-l14-336-geometry``: the CLIPModel the 336 tower comes from (TeCoA's text side).

``--width full`` keeps the towers at their exact size; the LMs keep the widths of Llama-2-7B and Mistral-7B but
only 2 and 3 layers (a 7B LM takes 27 GB in float32). ``--width reduced`` shrinks hidden sizes and depths but keeps
patch size, image size, feature layer, strategy and image-token counts exact. ``--width tiny`` is the smallest
setting that still runs every stage (the test suite's).

The LMs answer in one word and then stop (see :func:`answer_in_one_word`), so a model's own answer can serve as
the VQA reference and the evaluation's attacks must start from correct samples.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

#: image sizes of the generated folder: landscape / portrait COCO shapes exercise crop and pad_to_square
IMAGE_SIZES = [(640, 427), (427, 640), (500, 375), (480, 480), (612, 612), (640, 360)]
CLASSES = ("circle", "square")
#: the only tokens the stand-in LMs answer with (whole words of the small trained vocabulary)
ANSWER_WORDS = ("▁red", "▁blue", "▁green", "▁yellow", "▁circle", "▁square", "▁star", "▁triangle")
VQA_QUESTIONS = ("What is in the image?", "What color is the shape?")
VQA_SUFFIX = " Answer the question using a single word or phrase."
EPS = "2/255"


@dataclass(frozen=True)
class Width:
    """Sizes of the stand-ins; patch size, image sizes, feature layer and strategy are always exact."""

    tower_hidden: int
    tower_intermediate: int
    tower_layers: int
    tower_heads: int
    clip_projection: int
    clip_text_hidden: int
    clip_text_layers: int
    clip_text_heads: int
    lm_hidden: int
    lm_intermediate: int
    lm_layers: int
    lm_heads: int
    target_hidden: int
    target_intermediate: int
    target_layers: int
    target_heads: int
    target_kv_heads: int
    images: int  # images in the generated folder (and VQA samples)
    batch: int  # training micro-batch
    attack_steps: int
    train_steps: int


WIDTHS = {
    # ViT-L/14-336 exactly; the LMs at the width of Llama-2-7B (4096/11008, 32 heads) and Mistral-7B
    # (4096/14336, 32 heads, 8 KV heads), 2 and 3 layers instead of 32.
    "full": Width(1024, 4096, 24, 16, 768, 768, 12, 12, 4096, 11008, 2, 32, 4096, 14336, 3, 32, 8,
                  images=2, batch=1, attack_steps=2, train_steps=2),
    "reduced": Width(128, 512, 4, 4, 64, 64, 2, 4, 128, 256, 2, 4, 192, 384, 2, 4, 2,
                     images=6, batch=2, attack_steps=3, train_steps=2),
    "tiny": Width(32, 64, 3, 2, 16, 32, 1, 2, 32, 64, 1, 2, 48, 96, 1, 4, 2,
                  images=4, batch=2, attack_steps=2, train_steps=1),
}


# ----------------------------------------------------------------------------------------------------
# Stand-ins
# ----------------------------------------------------------------------------------------------------
def tower_config(width: Width, image_size: int):
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(
        hidden_size=width.tower_hidden, intermediate_size=width.tower_intermediate,
        num_hidden_layers=width.tower_layers, num_attention_heads=width.tower_heads, image_size=image_size,
        patch_size=14, hidden_act="quick_gelu", projection_dim=width.clip_projection, layer_norm_eps=1e-5,
    )


def clip_tokenizer():
    """The Llama-2-style tokenizer made to end every text with an end-of-text token of the highest id, as CLIP's
    does: CLIP's text tower pools there (without it, prompts that differ only after the pooled position embed alike)."""
    from adpo.testing import template_tokenizer

    tokenizer, _, _ = template_tokenizer("llava15")
    tokenizer.add_special_tokens({"eos_token": "<|endoftext|>"})
    tokenizer.add_eos_token = True
    return tokenizer


def clip_model(width: Width, image_size: int, seed: int, tokenizer):
    """A random CLIPModel with the tower's geometry (the CLIP model a LLaVA-1.5 tower is taken from)."""
    import torch
    from transformers import CLIPConfig, CLIPModel, CLIPTextConfig

    text = CLIPTextConfig(hidden_size=width.clip_text_hidden, intermediate_size=4 * width.clip_text_hidden,
                          num_hidden_layers=width.clip_text_layers, num_attention_heads=width.clip_text_heads,
                          projection_dim=width.clip_projection, hidden_act="quick_gelu", max_position_embeddings=77,
                          vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id,
                          bos_token_id=tokenizer.bos_token_id, pad_token_id=tokenizer.pad_token_id)
    config = CLIPConfig(text_config=text.to_dict(), vision_config=tower_config(width, image_size).to_dict(),
                        projection_dim=width.clip_projection)
    torch.manual_seed(seed)
    return CLIPModel(config).eval()


def answer_in_one_word(model, processor, calibration_pixels, words=ANSWER_WORDS) -> None:
    """Rewrite a random LVLM's LM so that greedy decoding answers one of ``words`` (which one depends on the
    image) and then the end-of-turn token.

    Two residual dimensions no layer writes to (their rows in every o_proj and down_proj are zero) carry the token's
    own embedding to the LM head: d0 holds a constant C for every token, d1 holds C for answer words only. C is the
    typical RMS of the last hidden state, so both come out of the final norm as about 1 and the head's weights on
    them act as logit offsets: -1000 on d0 for every other token (never chosen); -4 on d0 and +1000 on d1 for the
    end-of-turn token (it loses to some word after the prompt and wins right after a word); random rows on the
    other dimensions for the words (logits ~N(0, 1), image-dependent). A random model's answers then re-tokenise to
    themselves and end where generation stops: what an attack on "the model's own answer" needs (a random LM
    otherwise rambles until max_new_tokens).
    """
    import torch

    from adpo.lvlm import LlavaView

    tokenizer = processor.tokenizer
    language_model = model.model.language_model
    head = model.get_output_embeddings().weight
    embed = language_model.get_input_embeddings().weight
    if head.data_ptr() == embed.data_ptr():
        raise ValueError("tied input/output embeddings: the LM head cannot be rewritten on its own")
    hidden = embed.shape[1]
    d0, d1 = hidden - 2, hidden - 1
    word_ids = [i for i in tokenizer.convert_tokens_to_ids(list(words)) if i != tokenizer.unk_token_id]
    eos = model.generation_config.eos_token_id
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in language_model.layers:
            layer.self_attn.o_proj.weight[[d0, d1]] = 0
            layer.mlp.down_proj.weight[[d0, d1]] = 0
        embed[:, [d0, d1]] = 0
        embed[:, d0] = 1.0
        # C: the RMS of the last hidden state where the answer starts (h[d0] = C / rms after the final norm)
        view = LlavaView(model, processor)
        encoded = view.encode(list(VQA_QUESTIONS[:1]) * len(calibration_pixels))
        states = model.model(input_ids=encoded.input_ids, attention_mask=encoded.attention_mask,
                             pixel_values=view.tower.normalize(calibration_pixels)).last_hidden_state
        norm_weight = language_model.norm.weight[d0]
        scale = float((norm_weight / states[:, -1, d0]).median())
        embed[:, d0] = scale
        embed[word_ids, d1] = scale
        head.zero_()
        rest = hidden - 2
        head[:, d0] = -1000.0
        head[word_ids, :rest] = torch.randn(len(word_ids), rest, generator=generator) / rest ** 0.5
        head[word_ids, d0] = 0.0
        head[eos, d0] = -4.0
        head[eos, d1] = 1000.0


def build_lvlm(style: str, vision, text, clip, seed: int, calibration_images):
    """A llava-hf-style LLaVA with ``style``'s tokenizer and template, ``clip``'s tower weights, one-word answers."""
    from adpo.encoder_io import put_encoder
    from adpo.preprocess import to_pixels
    from adpo.testing import template_llava

    model, processor = template_llava(style, seed=seed, vision_config=vision, text_config=text)
    put_encoder(model, clip.vision_model.state_dict())
    answer_in_one_word(model, processor, to_pixels(calibration_images, processor))
    return model, processor


def build_standins(out: Path, width: Width, dtype: str) -> dict:
    """Write the stand-in model directories under ``out/models`` and the image folder under ``out/images``."""
    import torch
    from transformers import CLIPProcessor, LlamaConfig, MistralConfig

    from adpo.preprocess import load_rgb
    from adpo.testing import tiny_image_processor

    images = write_images(out / "images", width.images)
    calibration = [load_rgb(p) for p in images[:2]]
    torch_dtype = getattr(torch, dtype)
    models = out / "models"
    written = {}

    def save(name, model, processor):
        path = models / name
        model.to(torch_dtype).save_pretrained(path)
        processor.save_pretrained(path)
        written[name] = str(path)

    llama = LlamaConfig(hidden_size=width.lm_hidden, intermediate_size=width.lm_intermediate,
                        num_hidden_layers=width.lm_layers, num_attention_heads=width.lm_heads,
                        num_key_value_heads=width.lm_heads, max_position_embeddings=4096, rms_norm_eps=1e-5)
    mistral = MistralConfig(hidden_size=width.target_hidden, intermediate_size=width.target_intermediate,
                            num_hidden_layers=width.target_layers, num_attention_heads=width.target_heads,
                            num_key_value_heads=width.target_kv_heads, max_position_embeddings=32768,
                            rms_norm_eps=1e-5, sliding_window=None)

    text_tokenizer = clip_tokenizer()
    clip336 = clip_model(width, 336, 336, text_tokenizer)
    save("clip-vit-l14-336-geometry", clip336, CLIPProcessor(image_processor=tiny_image_processor(336),
                                                             tokenizer=text_tokenizer))
    model, processor = build_lvlm("llava15", tower_config(width, 336), llama, clip336, 1, calibration)
    save("llava15-7b-geometry", model, processor)
    del model
    model, processor = build_lvlm("mistral", tower_config(width, 336), mistral, clip336, 2, calibration)
    save("mistral-target", model, processor)
    del model, clip336
    clip224 = clip_model(width, 224, 224, text_tokenizer)
    model, processor = build_lvlm("llava15", tower_config(width, 224), llama, clip224, 3, calibration)
    save("llava15-224-geometry", model, processor)
    return written


def write_images(folder: Path, count: int) -> list[Path]:
    """A labelled image folder (one sub-folder per class) of shapes on backgrounds, in COCO-like aspect ratios."""
    from PIL import Image, ImageDraw

    colours = [(200, 30, 30), (30, 60, 200), (30, 160, 60), (220, 200, 30)]
    paths = []
    for i in range(count):
        w, h = IMAGE_SIZES[i % len(IMAGE_SIZES)]
        shape = CLASSES[i % len(CLASSES)]
        image = Image.new("RGB", (w, h), tuple(40 + 25 * ((i + k) % 7) for k in range(3)))
        draw = ImageDraw.Draw(image)
        size = min(w, h) // 3
        cx, cy = w // 2 + (i * 37) % (w // 4) - w // 8, h // 2
        box = (cx - size, cy - size, cx + size, cy + size)
        (draw.ellipse if shape == "circle" else draw.rectangle)(box, fill=colours[i % len(colours)])
        path = folder / shape / f"image{i:02d}_{w}x{h}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path)
        paths.append(path)
    return paths



# ----------------------------------------------------------------------------------------------------
# Stage configs
# ----------------------------------------------------------------------------------------------------
def stage_configs(out: Path, width: Width, device: str, dtype: str) -> dict[str, dict]:
    """One YAML config per CLI stage, small enough for CPU; ``dtype: bfloat16`` gives the GPU settings."""
    models, runs = out / "models", out / "runs"
    bf16 = dtype == "bfloat16"
    source = str(models / "llava15-7b-geometry")
    common_training = {
        "per_device_train_batch_size": width.batch, "gradient_accumulation_steps": 1, "max_steps": width.train_steps,
        "logging_steps": 1, "save_strategy": "no", "report_to": [], "seed": 0, "bf16": bf16,
        "dataloader_num_workers": 0,
    }
    encoder_training = {
        **common_training, "dataset": str(out / "images"), "attack_eps": EPS, "attack_steps": width.attack_steps,
        "attack_step_size": "1/255", "learning_rate": 1.0e-5, "warmup_steps": 0,
    }
    adpo_training = {
        **common_training, "model_name_or_path": source, "model_dtype": dtype, "beta": 0.1, "aio_weight": 1.0,
        "learning_rate": 1.0e-5, "max_length": 1024,
        **({"gradient_checkpointing": True} if width is WIDTHS["full"] else {}),  # as the paper config
    }
    return {
        "pairs": {
            "model_name_or_path": source, "dtype": dtype, "source": str(out / "images"), "pad_to_square": True,
            "prompt_set": "paper", "attack_eps": EPS, "attack_steps": width.attack_steps, "embedding": "pooled", "seed": 0,
            "max_new_tokens": 4, "batch_size": 2, "images_per_shard": 2, "compute_ref_logps": True,
            "progress": False, "output_dir": str(runs / "pairs"),
            **({"device_map": device} if device == "cuda" else {}),
        },
        "adpo_stored": {
            **adpo_training, "pair_source": "stored", "dataset_path": str(runs / "pairs"),
            "use_stored_ref_logps": True, "save_lvlm": True, "output_dir": str(runs / "adpo_stored"),
        },
        "adpo_online": {
            **adpo_training, "pair_source": "online", "image_source": str(out / "images"), "max_images": 2,
            "prompt_set": "paper", "max_new_tokens": 4, "attack_eps": EPS, "attack_steps": width.attack_steps,
            "output_dir": str(runs / "adpo_online"),
        },
        "fare": {
            **encoder_training, "model_name_or_path": source, "embedding": "llm", "save_lvlm": True,
            "output_dir": str(runs / "fare"),
        },
        "tecoa": {
            **encoder_training, "model_name_or_path": source, "embedding": "pooled",
            "text_model_name_or_path": str(models / "clip-vit-l14-336-geometry"), "output_dir": str(runs / "tecoa"),
        },
        "fare_224": {
            **encoder_training, "model_name_or_path": str(models / "llava15-224-geometry"), "embedding": "llm",
            "output_dir": str(runs / "fare_224"),
        },
        "transfer": {
            "encoder": str(runs / "adpo_stored" / "encoder"), "target": str(models / "mistral-target"),
            "out": str(runs / "grafted"), "overwrite": True, "dtype": dtype, "device": device,
            "verify_data": str(out / "images"), "verify_samples": 2, "max_new_tokens": 4, "batch_size": 2,
            "feature_shift_eps": EPS, "feature_shift_steps": 1,
        },
        "eval": {
            "model": str(runs / "grafted"), "name": "grafted-adpo", "dtype": dtype, "device": device, "task": "vqa",
            "data": str(out / "vqa"), "num_samples": width.images, "question_suffix": VQA_SUFFIX, "max_new_tokens": 4,
            "attack_eps": [EPS], "attack_steps": width.attack_steps, "precision_schedule": ["bfloat16" if bf16 else "float32"],
            "vqa_targets": [], "step_check_steps": 0, "batch_size": 4, "num_examples": 1, "progress": False,
            "seed": 0, "output_dir": str(runs / "eval"),
        },
    }


#: stage -> (command after `adpo`, the stages whose outputs it reads)
STAGES = {
    "pairs": (["pairs"], ["build"]),
    "adpo_stored": (["train", "adpo"], ["pairs"]),
    "adpo_online": (["train", "adpo"], ["build"]),
    "fare": (["train", "fare"], ["build"]),
    "tecoa": (["train", "tecoa"], ["build"]),
    "fare_224": (["train", "fare"], ["build"]),
    "transfer": (["transfer"], ["adpo_stored"]),
    "eval": (["eval"], ["references"]),
}


# ----------------------------------------------------------------------------------------------------
# Steps that are not CLI stages: the VQA references and the checks
# ----------------------------------------------------------------------------------------------------
def make_vqa_references(out: Path, configs: dict) -> dict:
    """A VQA dataset (one question per image) whose reference answer is the grafted model's own greedy answer,
    computed through the evaluation's own loading and generation, so that every sample starts clean-correct."""
    from datasets import Dataset, Image as ImageFeature

    from adpo.eval.config import EvalConfig
    from adpo.eval.loading import prepare
    from adpo.eval.adapters import predict_in_batches

    images = sorted((out / "images").rglob("*.png"))
    questions = [VQA_QUESTIONS[i % len(VQA_QUESTIONS)] for i in range(len(images))]

    def save(path: Path, answers: list[list[str]]) -> None:
        rows = {"image": [str(p) for p in images], "question": questions, "answers": answers}
        Dataset.from_dict(rows).cast_column("image", ImageFeature()).save_to_disk(str(path))

    unanswered = out / "vqa_questions"
    save(unanswered, [["?"]] * len(images))
    config = EvalConfig(**{**configs["eval"], "data": str(unanswered)})
    model, samples, pixels, _ = prepare(config)
    answers = predict_in_batches(model, pixels, samples, config.batch_size)
    save(out / "vqa", [[a] for a in answers])
    return {"questions": questions, "answers": answers}


def read_tensors(directory: Path) -> dict:
    from safetensors.torch import load_file

    tensors = {}
    for file in sorted(Path(directory).glob("*.safetensors")):
        tensors.update(load_file(file))
    if not tensors:
        raise FileNotFoundError(f"no safetensors in {directory}")
    return tensors


def _is_tower(key: str) -> bool:
    return "vision_tower." in key


def _check(checks: list, name: str, ok: bool, detail: str) -> None:
    checks.append({"check": name, "ok": bool(ok), "detail": detail})


def check_encoding(checks: list, model_dir: Path, questions: list[str], answers: list[str], image, image_tokens: int) -> None:
    """Prompt ids equal the processor's (BOS included); answer labels are the answer and the end-of-turn token."""
    import torch

    from adpo.lvlm import LlavaView
    from adpo.models import load_lvlm

    model, processor = load_lvlm(str(model_dir), dtype="float32")
    view = LlavaView(model, processor)
    tokenizer = processor.tokenizer
    name = model_dir.name
    mismatched = []
    for question in dict.fromkeys(questions):
        ours = view.encode([question]).input_ids[0].tolist()
        theirs = processor(images=[image], text=view.format_prompt(question), return_tensors="pt")["input_ids"][0].tolist()
        if ours != theirs or ours[0] != tokenizer.bos_token_id or ours[1] == tokenizer.bos_token_id:
            mismatched.append(question)
    _check(checks, f"prompt_ids_equal_processor[{name}]", not mismatched,
           f"{len(set(questions)) - len(mismatched)}/{len(set(questions))} prompts identical to processor(...) with one "
           f"leading {tokenizer.bos_token}" + (f"; differ: {mismatched}" if mismatched else ""))
    count = int((view.encode([questions[0]]).input_ids[0] == model.config.image_token_id).sum())
    _check(checks, f"image_tokens[{name}]", count == image_tokens, f"{count} image tokens (expected {image_tokens})")
    eos = model.generation_config.eos_token_id
    wrong = []
    encoded = view.encode(questions, answers)
    for row, answer in enumerate(answers):
        tokens = encoded.input_ids[row][encoded.labels[row] != -100].tolist()
        if tokens[-1] != eos or eos in tokens[:-1] or tokenizer.decode(tokens[:-1]).strip() != answer.strip():
            wrong.append((answer, tokenizer.convert_ids_to_tokens(tokens)))
    _check(checks, f"labels_end_with_end_of_turn[{name}]", not wrong,
           f"{len(answers) - len(wrong)}/{len(answers)} answers labelled as their tokens + "
           f"{tokenizer.convert_ids_to_tokens(eos)}" + (f"; wrong: {wrong[:3]}" if wrong else ""))
    del model
    torch.cuda.empty_cache() if torch.cuda.is_available() else None


def check_pairs(checks: list, out: Path) -> tuple[list[str], list[str]]:
    import numpy as np

    from adpo.threat import parse_eps
    from pairs import load_pairs

    pairs = load_pairs(out / "runs" / "pairs")
    sizes = {row["image"].size for row in pairs} | {row["adv_image"].size for row in pairs}
    linf = max(int(np.abs(np.asarray(r["adv_image"], dtype=int) - np.asarray(r["image"], dtype=int)).max()) for r in pairs)
    budget = parse_eps(EPS) * 255
    _check(checks, "pairs_square_images_in_ball", len(pairs) > 0 and sizes == {(336, 336)} and linf <= budget + 1e-6,
           f"{len(pairs)} pairs, image sizes {sorted(sizes)} (pad_to_square of 640x427 etc.), max |x_adv - x| = "
           f"{linf}/255 <= {budget:g}/255; ref log-probs stored: {'ref_chosen_logps' in pairs.column_names}")
    return list(pairs["prompt"]) * 2, list(pairs["chosen"]) + list(pairs["rejected"])


def check_training(checks: list, run: str, run_dir: Path, base_dir: Path, uses: tuple[str, ...], lvlm: bool) -> None:
    """The exported encoder is float32, differs from the original tower, and leaves the tensors its objective cannot
    reach bit-identical; with save_lvlm, every non-tower tensor of <run>/lvlm is bit-identical to the original."""
    import torch
    from transformers import AutoImageProcessor, CLIPVisionModel

    from adpo.encoder_io import canonical_encoder_state
    from adpo.tower import VisionTower, unreachable_tower_parameters

    original = read_tensors(base_dir)
    tower = canonical_encoder_state(original)
    trained = canonical_encoder_state(read_tensors(run_dir / "encoder"))
    dtypes = sorted({str(t.dtype) for t in trained.values()})
    _check(checks, f"encoder_is_float32[{run}]", dtypes == ["torch.float32"], f"encoder/ dtypes {dtypes}")
    changed = sorted(k for k in tower if not torch.equal(trained[k], tower[k].to(trained[k].dtype)))
    encoder = CLIPVisionModel.from_pretrained(run_dir / "encoder")
    view = VisionTower.from_encoder(encoder, AutoImageProcessor.from_pretrained(run_dir / "encoder"), -2, "default")
    unreachable = set(canonical_encoder_state(dict.fromkeys(unreachable_tower_parameters(view, uses), None)))
    _check(checks, f"tower_trained[{run}]", set(trained) == set(tower) and changed and not (set(changed) & unreachable),
           f"{len(changed)}/{len(tower)} tower tensors changed; {len(unreachable)} unreachable from {uses} and unchanged"
           + (f"; changed although unreachable: {sorted(set(changed) & unreachable)[:3]}" if set(changed) & unreachable else ""))
    if lvlm:
        saved = read_tensors(run_dir / "lvlm")
        others = [k for k in original if not _is_tower(k)]
        differ = [k for k in others if k not in saved or saved[k].dtype != original[k].dtype or not torch.equal(saved[k], original[k])]
        saved_tower = canonical_encoder_state(saved)
        tower_ok = all(torch.equal(saved_tower[k], trained[k].to(saved_tower[k].dtype)) for k in trained)
        _check(checks, f"lvlm_only_tower_changed[{run}]", not differ and tower_ok and set(saved) == set(original),
               f"{len(others) - len(differ)}/{len(others)} non-tower tensors bit-identical in their stored dtype; tower = "
               f"encoder/: {tower_ok}" + (f"; differ: {differ[:3]}" if differ else ""))


def check_graft(checks: list, out: Path) -> None:
    import torch

    from adpo.encoder_io import canonical_encoder_state

    target = read_tensors(out / "models" / "mistral-target")
    grafted = read_tensors(out / "runs" / "grafted")
    donor = canonical_encoder_state(read_tensors(out / "runs" / "adpo_stored" / "encoder"))
    others = [k for k in target if not _is_tower(k)]
    differ = [k for k in others if k not in grafted or grafted[k].dtype != target[k].dtype or not torch.equal(grafted[k], target[k])]
    tower = canonical_encoder_state(grafted)
    tower_ok = set(tower) == set(donor) and all(torch.equal(tower[k], donor[k].to(tower[k].dtype)) for k in donor)
    _check(checks, "graft_non_tower_bit_identical", not differ and tower_ok,
           f"{len(others) - len(differ)}/{len(others)} non-tower tensors of the target bit-identical; grafted tower = "
           f"AdPO encoder: {tower_ok}" + (f"; differ: {differ[:3]}" if differ else ""))


def check_eval(checks: list, out: Path) -> None:
    report = json.loads((out / "runs" / "eval" / "report.json").read_text())
    label = report["robust"][0]["eps_label"]
    correct = [s for s in report["samples"] if not s["clean"]["broken"]]
    stepless = [s["id"] for s in correct if s["robust"][label]["steps"] < 1]
    _check(checks, "eval_attack_took_steps", correct and not stepless,
           f"{len(correct)}/{len(report['samples'])} samples clean-correct; each took >= 1 gradient step at {label} "
           f"(steps {[s['robust'][label]['steps'] for s in correct]})"
           + (f"; no step on {stepless}" if stepless else ""))
    primary = report["primary_metric"]
    clean, robust = report["clean"][primary], report["robust"][0]["metrics"][primary]
    _check(checks, "eval_robust_at_most_clean", robust <= clean, f"{primary}: robust {robust:.3f} <= clean {clean:.3f}")
    failed = [c for c in report.get("sanity", []) if c["status"] == "fail"]
    _check(checks, "eval_sanity_checks", not failed, "report's sanity checks: "
           + ", ".join(f"{c['check']}={c['status']}" for c in report.get("sanity", [])))


def run_checks(out: Path, stages_ok: dict[str, bool]) -> list[dict]:
    """Every property issue 24 asks for, on what the stages wrote; a stage that failed skips its checks."""
    from adpo.preprocess import load_rgb

    checks: list[dict] = []
    models = out / "models"
    image = load_rgb(sorted((out / "images").rglob("*.png"))[0])
    questions, answers = list(VQA_QUESTIONS), ["red", "blue circle"]
    if stages_ok.get("pairs"):
        pair_prompts, pair_answers = check_pairs(checks, out)
        questions, answers = questions + pair_prompts, answers + pair_answers
    check_encoding(checks, models / "llava15-7b-geometry", questions, answers, image, 576)
    check_encoding(checks, models / "llava15-224-geometry", list(VQA_QUESTIONS), ["red", "blue circle"], image, 256)
    target_answers = ["red", "blue circle"]
    if stages_ok.get("references"):
        from datasets import load_from_disk

        target_answers = [a[0] for a in load_from_disk(str(out / "vqa"))["answers"]]
    target_questions = [VQA_QUESTIONS[i % len(VQA_QUESTIONS)] + VQA_SUFFIX for i in range(len(target_answers))]
    check_encoding(checks, models / "mistral-target", target_questions, target_answers, image, 576)
    base = models / "llava15-7b-geometry"
    for run, uses, lvlm, base_dir in (("adpo_stored", ("llm",), True, base), ("adpo_online", ("llm",), False, base),
                                      ("fare", ("llm",), True, base), ("tecoa", ("pooled",), False, base),
                                      ("fare_224", ("llm",), False, models / "llava15-224-geometry")):
        if stages_ok.get(run):
            check_training(checks, run, out / "runs" / run, base_dir, uses, lvlm)
    if stages_ok.get("transfer"):
        check_graft(checks, out)
    if stages_ok.get("eval"):
        check_eval(checks, out)
    return checks


# ----------------------------------------------------------------------------------------------------
# Running the stages
# ----------------------------------------------------------------------------------------------------
#: every step in order: CLI stages from STAGES, and this script's own steps (run as a child process too, so each
#: step's peak memory is its own)
ORDER = ["build", "pairs", "adpo_stored", "adpo_online", "fare", "tecoa", "fare_224", "transfer", "references",
         "eval", "checks"]
OWN_STEPS = {"build": [], "references": ["transfer"], "checks": []}


def child_environment(device: str) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_VERBOSITY="error",
               TOKENIZERS_PARALLELISM="false", PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # the CPU run stays on the CPU even where a GPU is present
    return env


def run_step(argv: list[str], log: Path, env: dict) -> dict:
    """Run one step as a child process; its wall time, exit code and peak resident memory (its own, by wait4)."""
    start = time.perf_counter()
    with open(log, "w") as stream:
        process = subprocess.Popen(argv, stdout=stream, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    return {"seconds": round(time.perf_counter() - start, 1), "returncode": process.returncode,
            "peak_rss_mib": round(usage.ru_maxrss / 1024, 1)}  # ru_maxrss is in KiB on Linux


def run_in_process(step: str, args, log: Path) -> dict:
    """Run one step in this process (no interpreter start-up per stage); peak RSS is this process's so far."""
    import contextlib
    import traceback

    start = time.perf_counter()
    with open(log, "w") as stream, contextlib.redirect_stdout(stream), contextlib.redirect_stderr(stream):
        try:
            if step in OWN_STEPS:
                code = run_own_step(argparse.Namespace(**{**vars(args), "step": step}))
            else:
                from adpo.cli import main as adpo_main

                code = adpo_main([*STAGES[step][0], "--config", str(Path(args.out).resolve() / "configs" / f"{step}.yaml")])
        except BaseException:  # noqa: BLE001 - a failed stage is recorded and the suite goes on
            traceback.print_exc()
            code = 1
    return {"seconds": round(time.perf_counter() - start, 1), "returncode": int(code or 0),
            "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


def run_suite(args) -> int:
    import yaml

    out = Path(args.out).resolve()
    width = WIDTHS[args.width]
    configs = stage_configs(out, width, args.device, args.dtype)
    (out / "configs").mkdir(parents=True, exist_ok=True)
    (out / "logs").mkdir(exist_ok=True)
    for stage, config in configs.items():
        (out / "configs" / f"{stage}.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    env = child_environment(args.device)
    if args.in_process:
        os.environ.update(env)  # before any stage touches CUDA, which reads CUDA_VISIBLE_DEVICES when it starts
    own = [sys.executable, str(Path(__file__).resolve()), "--out", str(out), "--width", args.width,
           "--device", args.device, "--dtype", args.dtype, "--step"]
    records, ok = [], {}
    for step in ORDER:
        needs = OWN_STEPS[step] if step in OWN_STEPS else STAGES[step][1]
        missing = [n for n in needs if not ok.get(n)]
        if missing:
            records.append({"stage": step, "skipped": f"needs {', '.join(missing)}"})
            ok[step] = False
            continue
        if step == "checks":
            (out / "stages.json").write_text(json.dumps(ok))
        if step in OWN_STEPS:
            argv = own + [step]
        else:
            argv = [sys.executable, "-m", "adpo.cli", *STAGES[step][0], "--config", str(out / "configs" / f"{step}.yaml")]
        log = out / "logs" / f"{step}.log"
        measured = run_in_process(step, args, log) if args.in_process else run_step(argv, log, env)
        record = {"stage": step, "command": " ".join(argv), **measured}
        ok[step] = record["returncode"] == 0
        records.append(record)
        status = "ok" if ok[step] else f"FAILED (exit {record['returncode']}; see {out / 'logs' / (step + '.log')})"
        print(f"{step:12s} {record['seconds']:8.1f} s {record['peak_rss_mib']:9.1f} MiB  {status}", flush=True)
    checks = json.loads((out / "checks.json").read_text()) if ok.get("checks") else []
    passed = all(ok.values()) and bool(checks) and all(c["ok"] for c in checks)
    summary = {"ok": passed, "width": args.width, "device": args.device, "dtype": args.dtype, "in_process": args.in_process,
               "geometry": asdict(width), "stages": records, "checks": checks}
    (out / "conformance.json").write_text(json.dumps(summary, indent=2))
    print(render_table(summary))
    return 0 if passed else 1


def render_table(summary: dict) -> str:
    lines = [f"conformance ({summary['width']} width, {summary['device']}, {summary['dtype']})", "",
             "| stage | seconds | peak RSS (MiB) | status |", "| --- | ---: | ---: | --- |"]
    for r in summary["stages"]:
        if "skipped" in r:
            lines.append(f"| {r['stage']} | | | skipped: {r['skipped']} |")
        else:
            lines.append(f"| {r['stage']} | {r['seconds']:.1f} | {r['peak_rss_mib']:.0f} | "
                         f"{'ok' if r['returncode'] == 0 else 'exit ' + str(r['returncode'])} |")
    lines += ["", "| check | result | detail |", "| --- | --- | --- |"]
    lines += [f"| {c['check']} | {'PASS' if c['ok'] else 'FAIL'} | {c['detail']} |" for c in summary["checks"]]
    lines += ["", "ALL CHECKS PASS" if summary["ok"] else "CONFORMANCE FAILED"]
    return "\n".join(lines)


def run_own_step(args) -> int:
    out = Path(args.out).resolve()
    width = WIDTHS[args.width]
    if args.step == "build":
        print(json.dumps(build_standins(out, width, args.dtype), indent=2))
    elif args.step == "references":
        print(json.dumps(make_vqa_references(out, stage_configs(out, width, args.device, args.dtype)), indent=2))
    elif args.step == "checks":
        checks = run_checks(out, json.loads((out / "stages.json").read_text()))
        (out / "checks.json").write_text(json.dumps(checks, indent=2))
        for c in checks:
            print(f"{'PASS' if c['ok'] else 'FAIL'} {c['check']}: {c['detail']}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="working directory: models/, images/, configs/, runs/, logs/, "
                                                     "conformance.json")
    parser.add_argument("--width", choices=sorted(WIDTHS), default="reduced",
                        help="full: exact towers, LMs at 7B width with 2-3 layers (about 45 min and 12 GB on 2 CPU cores); "
                             "reduced: everything small but the geometry (minutes); tiny: the test suite's")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="where every stage runs; cpu hides any GPU from the stages (CUDA_VISIBLE_DEVICES='')")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="dtype the stand-ins are stored and run in (bfloat16 with --device cuda: the GPU setting)")
    parser.add_argument("--in-process", action="store_true",
                        help="run every stage in this process (adpo.cli.main) instead of one process each: no start-up "
                             "cost per stage, but the peak-RSS column is then this process's running peak")
    parser.add_argument("--step", choices=sorted(OWN_STEPS), help=argparse.SUPPRESS)  # one of this script's steps
    args = parser.parse_args(argv)
    return run_own_step(args) if args.step else run_suite(args)


if __name__ == "__main__":
    sys.exit(main())
