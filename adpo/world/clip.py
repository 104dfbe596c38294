"""WorldCLIP: a small transformers ``CLIPModel`` trained contrastively on the bundled world's captions.

The architecture is the real CLIP (ViT vision tower + causal text transformer + projections) with a small
config: 64x64 images in 16x16 patches (16 patch tokens + CLS), so the world's LVLMs stay cheap on CPU. The
tokenizer is word-level over the world's vocabulary (built with ``tokenizers``, wrapped in
``PreTrainedTokenizerFast``); the image processor is transformers' CLIP processor with OpenAI's mean/std.

Shipped weights live in ``adpo/world/weights/clip/`` (fp16 safetensors + configs + tokenizer + preprocessor
+ ``training.json``); :func:`load_world_clip` loads them as fp32. ``train_world_clip`` rebuilds them.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from adpo.io import atomic_directory
from adpo.losses.multimodal import clip_contrastive_loss
from adpo.world.data import (
    CLASS_NAMES, CLASS_PROMPT_TEMPLATE, IMAGE_SIZE, SHAPES, class_index, load_world_dataset, world_vocabulary,
)
from adpo.zeroshot import zero_shot_classifier

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights" / "clip"
TRAINING_RECORD = "training.json"
MAX_TEXT_LENGTH = 32
SPECIAL_TOKENS = {"pad": "[PAD]", "unk": "[UNK]", "bos": "[BOS]", "eos": "[EOS]"}
# Punctuation that the captions and questions use; the whitespace pre-tokenizer splits it off words.
PUNCTUATION = [":", "?", ",", "."]
OPENAI_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


# ------------------------------------------------------------------------------------- tokenizer/processor


def build_world_tokenizer():
    """Word-level tokenizer over the world vocabulary: lower-cases, splits on whitespace/punctuation, adds BOS/EOS."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    # Ids 0..3 are the special tokens; EOS is 3 (not 2) so CLIP pools at the first EOS, not at argmax(input_ids).
    tokens = [SPECIAL_TOKENS[k] for k in ("pad", "unk", "bos", "eos")] + PUNCTUATION + world_vocabulary()
    vocab = {token: i for i, token in enumerate(tokens)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=SPECIAL_TOKENS["unk"]))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    bos, eos = SPECIAL_TOKENS["bos"], SPECIAL_TOKENS["eos"]
    backend.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A {eos}", special_tokens=[(bos, vocab[bos]), (eos, vocab[eos])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=bos,
        eos_token=eos,
        pad_token=SPECIAL_TOKENS["pad"],
        unk_token=SPECIAL_TOKENS["unk"],
        model_max_length=MAX_TEXT_LENGTH,
    )


def build_world_image_processor():
    """CLIP image processor for 64x64 inputs (the PIL backend: no torchvision needed)."""
    try:
        from transformers import CLIPImageProcessorPil as processor_class
    except ImportError:  # older transformers: the slow processor is the PIL one
        from transformers import CLIPImageProcessor as processor_class
    return processor_class(
        size={"shortest_edge": 64},
        crop_size={"height": 64, "width": 64},
        image_mean=OPENAI_CLIP_MEAN,
        image_std=OPENAI_CLIP_STD,
    )


def build_world_processor():
    from transformers import CLIPProcessor

    return CLIPProcessor(image_processor=build_world_image_processor(), tokenizer=build_world_tokenizer())


# -------------------------------------------------------------------------------------------- model config


@dataclass
class WorldClipSize:
    """Tower sizes. The default is the shipped WorldCLIP; tests use a tiny one."""

    # Small on purpose: on 2 shared CPU cores steps/s, not capacity, limits what the tower learns.
    vision_hidden: int = 192
    vision_layers: int = 4
    vision_heads: int = 6
    vision_intermediate: int = 768
    text_hidden: int = 128  # the text tower only has to tell ~60 words in short templates apart
    text_layers: int = 2
    text_heads: int = 4
    text_intermediate: int = 512
    projection_dim: int = 128
    patch_size: int = 16


def build_world_clip_config(tokenizer, size: WorldClipSize | None = None):
    from transformers import CLIPConfig, CLIPTextConfig, CLIPVisionConfig

    size = size or WorldClipSize()
    vision = CLIPVisionConfig(
        image_size=64,
        patch_size=size.patch_size,
        num_channels=3,
        hidden_size=size.vision_hidden,
        num_hidden_layers=size.vision_layers,
        num_attention_heads=size.vision_heads,
        intermediate_size=size.vision_intermediate,
        hidden_act="quick_gelu",
        projection_dim=size.projection_dim,
    )
    text = CLIPTextConfig(
        vocab_size=len(tokenizer),
        max_position_embeddings=MAX_TEXT_LENGTH,
        hidden_size=size.text_hidden,
        num_hidden_layers=size.text_layers,
        num_attention_heads=size.text_heads,
        intermediate_size=size.text_intermediate,
        hidden_act="quick_gelu",
        projection_dim=size.projection_dim,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return CLIPConfig(
        text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=size.projection_dim
    )


# ------------------------------------------------------------------------------------------------- training


@dataclass
class WorldClipTrainingConfig:
    """Settings of ``train_world_clip`` (recorded in ``training.json`` beside the weights)."""

    seed: int = 0
    data_seed: int = 0
    epochs: int = 2
    batch_size: int = 256
    learning_rate: float = 1e-3
    weight_decay: float = 0.05
    warmup_fraction: float = 0.05
    max_shift: int = 3  # random translation in pixels (augmentation that keeps left/right meaning)
    n_train: int | None = None  # None: the whole train split
    # More procedural images: the train splits of these dataset seeds join data_seed's (WorldCLIP only; the
    # LVLMs and every evaluation keep data_seed's splits). Fresh images, not more epochs, keep a long run from
    # memorising the 10k training images.
    extra_train_seeds: list[int] = field(default_factory=lambda: list(range(1, 8)))
    threads: int = 1  # one thread: OpenMP spin-waits collapse throughput when the cores are shared
    bf16: bool = True  # bf16 autocast (weights stay fp32): ~1.3x faster on AVX512-BF16 CPU cores
    # The shipped weights trained on one H100 ("cuda"): 7.7 min, 4.8 of them building the 80k-image tables.
    # The same run on 2 CPU cores takes about 1.5 h (estimated from the per-image cost of earlier CPU runs).
    device: str = "cpu"
    class_prompt_probability: float = 0.2  # else one of the image's captions, uniformly
    class_prompt_loss: bool = True  # add image-vs-all-class-prompts InfoNCE (see clip_training_step)
    eval_every_steps: int = 500  # log zero-shot accuracy on 250 val images this often (0: never)
    steps: int | None = 4000  # total optimiser steps (cycling through the shuffled train images); None: epochs
    # The 48-way class-prompt loss ties image embeddings to the zero-shot prompts; captions add wording/position.
    caption_loss_weight: float = 0.5
    class_loss_weight: float = 1.0
    # Auxiliary per-patch classification (which object, or background, covers each patch; head discarded after
    # training). A ViT this small has no locality prior, and on a CPU budget the image-level losses alone leave
    # shape near chance: this dense signal made shape learnable in the steps we can afford (see docs/world.md).
    patch_loss_weight: float = 1.0
    # Where the patch loss reads the tokens: -2 is the layer the world's LVLMs read (LLaVA-1.5's feature layer).
    # With the loss on the last layer only, a linear probe found shape at layer -2 far weaker (77 % vs 92 %).
    patch_loss_layer: int = -2
    best_val_dir: str | None = None  # when set, save the model there whenever val accuracy improves


def _pixel_tensor(dataset, image_processor, batch: int = 500) -> torch.Tensor:
    """All images of a dataset as normalised pixel values [N, 3, 64, 64] (the processor's own pipeline)."""
    chunks = []
    for start in range(0, len(dataset), batch):
        images = dataset[start : start + batch]["image"]
        chunks.append(image_processor(images=images, return_tensors="pt")["pixel_values"])
    return torch.cat(chunks)


def _text_table(dataset, tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image: its captions plus its class prompt, tokenised -> ids [N, T, L] and mask [N, T, L]."""
    texts = [
        list(captions) + [CLASS_PROMPT_TEMPLATE.format(CLASS_NAMES[label])]
        for captions, label in zip(dataset["captions"], dataset["label"])
    ]
    per_image = {len(t) for t in texts}
    if len(per_image) != 1:
        raise ValueError(f"every image needs the same number of captions; got counts {sorted(per_image)}")
    flat = [t for group in texts for t in group]
    encoded = tokenizer(flat, padding="max_length", max_length=MAX_TEXT_LENGTH, truncation=True, return_tensors="pt")
    unknown = (encoded["input_ids"] == tokenizer.unk_token_id).any(dim=1)
    if unknown.any():
        bad = flat[int(unknown.nonzero()[0, 0])]
        raise ValueError(f"caption {bad!r} has words outside the world vocabulary; extend world_vocabulary()")
    shape = (len(texts), per_image.pop(), MAX_TEXT_LENGTH)
    # Trim the padding no text uses: the text tower's cost grows with the sequence length.
    longest = int(encoded["attention_mask"].sum(dim=1).max())
    return encoded["input_ids"].view(shape)[..., :longest], encoded["attention_mask"].view(shape)[..., :longest]


def contrastive_loss(
    image_embeds: torch.Tensor, text_embeds: torch.Tensor, logit_scale: torch.Tensor, ignore: torch.Tensor | None = None
) -> torch.Tensor:
    """CLIP's symmetric InfoNCE (:func:`adpo.losses.multimodal.clip_contrastive_loss`) with the model's learned
    ``logit_scale`` parameter (the logarithm of the scale)."""
    return clip_contrastive_loss(image_embeds, text_embeds, logit_scale.exp(), ignore)


def _shift(pixels: torch.Tensor, max_shift: int, generator: torch.Generator, *maps: torch.Tensor):
    """Random translation by up to ``max_shift`` pixels (replicate padding, then crop back).

    Any ``maps`` ([B, H, W] label maps) get the same translation; then a tuple ``(pixels, *maps)`` is returned.
    """
    if max_shift == 0:
        return (pixels, *maps) if maps else pixels
    size = pixels.shape[-1]
    dx, dy = torch.randint(0, 2 * max_shift + 1, (2,), generator=generator).tolist()

    def crop(x: torch.Tensor) -> torch.Tensor:
        padded = F.pad(x, [max_shift] * 4, mode="replicate")
        return padded[..., dy : dy + size, dx : dx + size]

    if not maps:
        return crop(pixels)
    return (crop(pixels), *(crop(m[:, None].float())[:, 0].long() for m in maps))


def object_label_maps(objects_column, size: int = IMAGE_SIZE) -> torch.Tensor:
    """Per-pixel class map [N, H, W] of each image: the class of the object covering the pixel, else background.

    Objects are approximated by their bounding circle (radius = the object's size), which is all a patch-level
    target needs; background is class ``len(CLASS_NAMES)``.
    """
    coords = torch.arange(size, dtype=torch.float32) + 0.5
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    maps = torch.full((len(objects_column), size, size), len(CLASS_NAMES), dtype=torch.uint8)
    for i, objects in enumerate(objects_column):
        # Draw the smaller objects last so an overlap (there is none by construction) would favour them.
        for obj in sorted(objects, key=lambda o: -o["size"]):
            inside = (xx - obj["x"]) ** 2 + (yy - obj["y"]) ** 2 <= obj["size"] ** 2
            maps[i][inside] = class_index(obj["color"], obj["shape"])
    return maps


def patch_labels(label_maps: torch.Tensor, patch_size: int, min_cover: float = 0.1) -> torch.Tensor:
    """Per-patch targets [B, P] from pixel maps: the object class covering most of the patch if it covers at
    least ``min_cover`` of it, else background."""
    background = len(CLASS_NAMES)
    batch, size = label_maps.shape[0], label_maps.shape[-1]
    n = size // patch_size
    onehot = F.one_hot(label_maps.long(), background + 1).float()  # [B, H, W, C+1]
    cover = onehot.view(batch, n, patch_size, n, patch_size, -1).mean(dim=(2, 4)).flatten(1, 2)  # [B, P, C+1]
    objects_cover, objects_class = cover[..., :background].max(dim=-1)
    return torch.where(objects_cover >= min_cover, objects_class, torch.full_like(objects_class, background))


def clip_training_step(
    model, optimizer, pixel_values, input_ids, attention_mask, labels=None, class_ids=None, class_mask=None,
    bf16: bool = False, caption_loss_weight: float = 1.0, class_loss_weight: float = 1.0,
    patch_head=None, patch_targets=None, patch_loss_weight: float = 1.0, patch_layer: int = -2,
) -> float:
    """One contrastive update; returns the loss before the update.

    The loss is in-batch symmetric InfoNCE between images and their texts; with ``labels`` and the tokenised
    class prompts (``class_ids``/``class_mask`` [C, L], same L as ``input_ids``) it adds an image-to-all-class-
    prompts InfoNCE, a dense signal that every image gets each step, and drops the in-batch false negatives
    (other images of the same class) from the caption InfoNCE. Repeated texts are encoded once. With
    ``patch_head`` (a linear layer, updated by the same optimizer) and ``patch_targets`` [B, P] it adds
    cross-entropy of every patch token's class (see :func:`patch_labels`), read at hidden-state ``patch_layer``.
    """
    model.train()
    texts, masks = input_ids, attention_mask
    if labels is not None:
        texts, masks = torch.cat([input_ids, class_ids]), torch.cat([attention_mask, class_mask])
    unique_ids, inverse = torch.unique(texts, dim=0, return_inverse=True)
    unique_mask = torch.zeros_like(unique_ids)
    unique_mask[inverse] = masks
    with torch.autocast(pixel_values.device.type, dtype=torch.bfloat16, enabled=bf16):
        vision = model.vision_model(pixel_values=pixel_values, output_hidden_states=patch_head is not None)
        image_embeds = model.visual_projection(vision.pooler_output)
        text_embeds = model.get_text_features(input_ids=unique_ids, attention_mask=unique_mask)
        patch_logits = None if patch_head is None else patch_head(vision.hidden_states[patch_layer][:, 1:])
    image_embeds = image_embeds.float()
    text_embeds = getattr(text_embeds, "pooler_output", text_embeds).float()[inverse]
    batch = len(input_ids)
    same_class = None
    if labels is not None:
        # Same-class pairs off the diagonal are false negatives: with 48 classes a batch of 64 holds many.
        same_class = (labels[:, None] == labels[None, :]) & ~torch.eye(batch, dtype=torch.bool, device=labels.device)
    loss = caption_loss_weight * contrastive_loss(image_embeds, text_embeds[:batch], model.logit_scale, same_class)
    if labels is not None:
        class_logits = model.logit_scale.exp() * F.normalize(image_embeds, dim=-1) @ F.normalize(
            text_embeds[batch:], dim=-1
        ).t()
        loss = loss + class_loss_weight * F.cross_entropy(class_logits, labels)
    if patch_logits is not None:
        loss = loss + patch_loss_weight * F.cross_entropy(patch_logits.float().flatten(0, 1), patch_targets.flatten())
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    with torch.no_grad():
        model.logit_scale.clamp_(0, math.log(100.0))
    return loss.item()


def train_world_clip(
    out_dir: str | os.PathLike | None = None,
    seed: int = 0,
    epochs: int | None = None,
    config: WorldClipTrainingConfig | None = None,
    size: WorldClipSize | None = None,
    progress: bool = True,
    evaluate: bool = True,
):
    """Train WorldCLIP from scratch (on the train splits of ``data_seed`` and ``extra_train_seeds``) and save it (fp16)
    to ``out_dir`` (default: the shipped dir).

    Returns ``(model, processor, record)``; ``record`` is what ``training.json`` holds (settings, wall time,
    test zero-shot accuracy when ``evaluate``).
    """
    from transformers import CLIPModel
    from transformers.optimization import get_cosine_schedule_with_warmup

    # ``epochs`` (when given) replaces the default step count by whole passes over the train split.
    config = config or WorldClipTrainingConfig(seed=seed, **({} if epochs is None else {"epochs": epochs, "steps": None}))
    size = size or WorldClipSize()
    torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    started = time.time()

    train_seeds = [config.data_seed, *config.extra_train_seeds]
    if len(set(train_seeds)) < len(train_seeds):
        raise ValueError(
            f"extra_train_seeds {config.extra_train_seeds} with data_seed {config.data_seed} name a seed twice: "
            "name each seed once (every extra seed's train split is added to data_seed's)"
        )
    processor = build_world_processor()
    from datasets import concatenate_datasets

    dataset = concatenate_datasets([
        load_world_dataset("train", n=config.n_train, seed=seed, progress=progress)
        for seed in train_seeds
    ])
    pixels = _pixel_tensor(dataset, processor.image_processor)
    text_ids, text_mask = _text_table(dataset, processor.tokenizer)
    prompts = processor.tokenizer(
        [CLASS_PROMPT_TEMPLATE.format(name) for name in CLASS_NAMES],
        padding="max_length", max_length=text_ids.shape[-1], return_tensors="pt",
    )
    labels = torch.tensor(dataset["label"])
    label_maps = object_label_maps(dataset["objects"]) if config.patch_loss_weight else None

    model = CLIPModel(build_world_clip_config(processor.tokenizer, size)).to(config.device)
    # The patch head only shapes the tower during training; it is not part of the saved CLIPModel.
    patch_head = (
        torch.nn.Linear(size.vision_hidden, len(CLASS_NAMES) + 1).to(config.device) if config.patch_loss_weight else None
    )
    trained = list(model.named_parameters()) + ([] if patch_head is None else list(patch_head.named_parameters()))
    decay = [p for n, p in trained if p.ndim >= 2 and "embedding" not in n]
    no_decay = [p for n, p in trained if not (p.ndim >= 2 and "embedding" not in n)]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=config.learning_rate,
        betas=(0.9, 0.98),
        eps=1e-6,
    )
    steps_per_epoch = len(dataset) // config.batch_size
    total_steps = config.steps if config.steps is not None else steps_per_epoch * config.epochs
    scheduler = get_cosine_schedule_with_warmup(optimizer, int(config.warmup_fraction * total_steps), total_steps)

    val = load_world_dataset("val", n=250, seed=config.data_seed, progress=progress) if config.eval_every_steps else None
    prep_seconds = time.time() - started  # data generation/loading and tensor tables, before the first step
    losses: list[float] = []
    val_accuracy: list[tuple[int, float]] = []
    bar = tqdm(total=total_steps, desc="WorldCLIP", disable=not progress)
    best_val = -1.0
    for epoch in range(math.ceil(total_steps / steps_per_epoch)):
        order = torch.randperm(len(dataset), generator=generator)
        for step in range(min(steps_per_epoch, total_steps - epoch * steps_per_epoch)):
            idx = order[step * config.batch_size : (step + 1) * config.batch_size]
            # The class prompt is the table's last column; otherwise pick one of the captions.
            caption = torch.randint(0, text_ids.shape[1] - 1, (len(idx),), generator=generator)
            use_prompt = torch.rand(len(idx), generator=generator) < config.class_prompt_probability
            which = torch.where(use_prompt, text_ids.shape[1] - 1, caption)
            # Tables stay on the CPU (seeded indexing); only the batch moves to the training device.
            if patch_head is None:
                batch = {"pixel_values": _shift(pixels[idx], config.max_shift, generator)}
            else:
                shifted, maps = _shift(pixels[idx], config.max_shift, generator, label_maps[idx])
                # Per-patch targets on the training device: the one-hot cover is the step's largest tensor.
                batch = {"pixel_values": shifted, "patch_targets": patch_labels(maps.to(config.device), size.patch_size)}
            batch |= {"input_ids": text_ids[idx, which], "attention_mask": text_mask[idx, which]}
            if config.class_prompt_loss:
                batch |= {"labels": labels[idx], "class_ids": prompts["input_ids"], "class_mask": prompts["attention_mask"]}
            batch = {key: value.to(config.device) for key, value in batch.items()}
            loss = clip_training_step(
                model, optimizer, bf16=config.bf16, caption_loss_weight=config.caption_loss_weight,
                class_loss_weight=config.class_loss_weight, patch_head=patch_head,
                patch_loss_weight=config.patch_loss_weight, patch_layer=config.patch_loss_layer, **batch,
            )
            scheduler.step()
            losses.append(loss)
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}", scale=f"{model.logit_scale.exp().item():.1f}")
            if val is not None and len(losses) % config.eval_every_steps == 0:
                val_accuracy.append((len(losses), zero_shot_accuracy(model, processor, val)))
                bar.write(f"step {len(losses)}: mean loss {np.mean(losses[-config.eval_every_steps:]):.4f}, "
                          f"val zero-shot accuracy {val_accuracy[-1][1]:.4f} ({time.time() - started:.0f}s)")
                if config.best_val_dir and val_accuracy[-1][1] > best_val:
                    best_val = val_accuracy[-1][1]
                    save_world_clip(model, processor, config.best_val_dir, {"step": len(losses), "val": best_val})
    bar.close()
    train_seconds = time.time() - started

    model.eval()
    record = {
        "training": asdict(config),
        "size": asdict(size),
        "train_images": len(dataset),
        "steps": total_steps,
        "first_loss": losses[0] if losses else None,
        "final_loss": float(np.mean(losses[-min(steps_per_epoch, 50):])) if losses else None,
        "val_zero_shot_accuracy_by_step": val_accuracy,
        "wall_seconds": round(train_seconds, 1),
        "data_prep_seconds": round(prep_seconds, 1),
        "torch_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
    }
    if evaluate:
        test = load_world_dataset("test", seed=config.data_seed, progress=progress)
        predicted = zero_shot_predictions(model, processor, test)
        truth = torch.tensor(test["label"])
        n_shapes = len(SHAPES)
        record["test_zero_shot_accuracy"] = float((predicted == truth).float().mean())
        record["test_color_accuracy"] = float((predicted // n_shapes == truth // n_shapes).float().mean())
        record["test_shape_accuracy"] = float((predicted % n_shapes == truth % n_shapes).float().mean())
        record["test_images"] = len(test)
    save_world_clip(model, processor, WEIGHTS_DIR if out_dir is None else out_dir, record)
    return model, processor, record


def save_world_clip(model, processor, out_dir: str | os.PathLike, record: dict | None = None) -> Path:
    """Atomically write model (fp16 safetensors), processor and ``training.json`` to ``out_dir``."""
    with atomic_directory(out_dir) as staging:
        half = type(model)(model.config)
        half.load_state_dict(model.state_dict())
        half.to(torch.float16).save_pretrained(staging, safe_serialization=True)
        processor.save_pretrained(staging)
        if record is not None:
            (staging / TRAINING_RECORD).write_text(json.dumps(record, indent=2) + "\n")
    return Path(out_dir)


# ------------------------------------------------------------------------------------------ loading/eval


def load_world_clip(weights_dir: str | os.PathLike | None = None):
    """The shipped (or a rebuilt) WorldCLIP as ``(CLIPModel in fp32, eval mode, CLIPProcessor)``."""
    from transformers import CLIPModel, CLIPProcessor

    weights_dir = Path(weights_dir) if weights_dir is not None else WEIGHTS_DIR
    if not (weights_dir / "config.json").exists():
        raise FileNotFoundError(
            f"no WorldCLIP weights in {weights_dir}; rebuild them with `adpo world build` "
            "(or adpo.world.clip.train_world_clip(out_dir))"
        )
    model = CLIPModel.from_pretrained(weights_dir, dtype=torch.float32)
    processor = CLIPProcessor.from_pretrained(weights_dir)
    return model.eval(), processor


@torch.no_grad()
def zero_shot_predictions(model, processor, dataset, batch_size: int = 250, progress: bool = False) -> torch.Tensor:
    """Predicted class (index into :data:`CLASS_NAMES`) of every ``dataset`` image: its nearest class prompt."""
    was_training = model.training
    model.eval()
    classifier = zero_shot_classifier(model, processor, CLASS_NAMES, CLASS_PROMPT_TEMPLATE)
    device = next(model.parameters()).device
    predicted = []
    for start in tqdm(range(0, len(dataset), batch_size), desc="zero-shot", disable=not progress, leave=False):
        rows = dataset[start : start + batch_size]
        pixels = processor.image_processor(images=rows["image"], return_tensors="pt")["pixel_values"].to(device)
        embeds = model.get_image_features(pixel_values=pixels.to(next(model.parameters()).dtype))
        embeds = F.normalize(getattr(embeds, "pooler_output", embeds).float(), dim=-1)
        predicted.append((embeds @ classifier.t()).argmax(dim=1).cpu())
    model.train(was_training)
    return torch.cat(predicted)


def zero_shot_accuracy(model, processor, dataset, batch_size: int = 250, progress: bool = False) -> float:
    """Fraction of ``dataset`` rows whose image is closest to the class prompt of its ``label``."""
    predicted = zero_shot_predictions(model, processor, dataset, batch_size, progress)
    return float((predicted == torch.tensor(dataset["label"])).float().mean())
