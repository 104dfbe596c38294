"""Rebuild every shipped weight of the bundled world: WorldCLIP, then the small and large LVLM projectors.

Projector training (LLaVA stage 1, on the world's data): the vision tower is frozen; the 2-layer GELU projector
learns, and so does a LoRA adapter on the LM (merged into the LM at assembly; ``lm_lora_rank=0`` keeps the LM
frozen). Back-propagating through a 135M/270M LM costs over a second per
sequence on a shared 2-core CPU, so training has three phases:

1. alignment (no LM pass, seconds): the projector regresses the LM's own input embeddings of a short
   textual description of the image ("two: big red circle left, small blue square right."), so that
   the LM first "reads" the image tokens as words;
2. the LM loss on the answer tokens of world VQA (and a few captions), which teaches the answer format and,
   through the LoRA adapter, lets the LM read the image tokens (with the LM frozen it confused shapes in
   single-object images whose WorldCLIP zero-shot shape accuracy is 97 %);
3. annealing: the same loss continued at lower learning rates, from the saved projector and adapter.

To keep phase 2 affordable:

* the tower's LLM features (layer -2, CLS dropped) are computed once for all training images;
* each sequence packs several question/answer turns about one image (the 16 image tokens and the template
  are paid once per image, not per question); the first turn has exactly the evaluation prompt format;
* the LM head runs only at positions that predict an answer token (Gemma's vocabulary is 262k);
* bf16 autocast is available (``bf16``) but off: on this CPU it was no faster than fp32.
"""

from __future__ import annotations

import json
import os
import random
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from adpo.io import atomic_directory
from adpo.world.clip import WorldClipTrainingConfig, train_world_clip
from adpo.world.lvlm import (
    LM_LORA_FILE,
    PROJECTOR_FILE,
    SIZES,
    WEIGHTS_DIR,
    answer_text,
    build_world_lvlm,
    load_projector,
    merge_lm_lora,
    projector_state,
    sha256_file,
    write_manifest,
)

STAGES = ("clip", "small", "large")
TRAINING_RECORD = "training.json"


@dataclass
class ProjectorTrainingConfig:
    """Settings of :func:`train_projector` (recorded in ``weights/<size>/training.json``)."""

    size: str = "small"
    seed: int = 0
    data_seed: int = 0
    # All of the train split: with 1000 images the projector overfitted (train 78 % vs val 61 % exact match on 96
    # questions). Features are computed once, so more images cost seconds, not step time.
    train_images: int = 10000
    steps: int = 400
    batch_size: int = 8
    turns: int = 4  # question/answer turns packed per sequence
    caption_fraction: float = 0.1  # sequences that are one caption turn instead
    learning_rate: float = 3e-3
    warmup_steps: int = 2  # then constant: a run cut short by max_seconds equals a run with steps=steps_run
    max_seconds: float | None = None  # wall-clock budget of phase 2 (None: run all steps)
    align_steps: int = 150  # phase 1 (embedding regression) steps
    align_batch_size: int = 128
    align_learning_rate: float = 1e-3
    bf16: bool = False  # measured: no faster than fp32 on this CPU under load, and less exact
    val_questions: int = 128  # greedy exact match on val questions at the end (0: skip)
    threads: int = 2
    # LoRA on the LM's attention and MLP projections, trained with the projector in phase 2 (0: LM frozen).
    lm_lora_rank: int = 16
    lm_lora_alpha: float = 32.0
    lm_lora_learning_rate: float = 1e-3
    lm_lora_targets: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    # Continue phase 2 from the projector already in the output folder (its record must name the same
    # WorldCLIP); skips phase 1. The learning rate is constant after warm-up, so continuing by N steps at the
    # same rates is a longer run, not a restart; the record keeps every run's steps, rates and losses.
    continue_training: bool = False
    # Phase 3, run by `adpo world build` after phase 2: a continuation at lower learning rates (0: none). After
    # 400 steps the loss was still falling (small) or noisy around a level (large); lower rates settle it.
    anneal_steps: int = 600
    anneal_learning_rate: float = 1e-3
    anneal_lm_lora_learning_rate: float = 3e-4

    def annealing(self) -> "ProjectorTrainingConfig":
        """Phase 3 as a continuation: the saved projector and adapter, fresh optimiser state, the lower rates."""
        return replace(self, steps=self.anneal_steps, learning_rate=self.anneal_learning_rate,
                       lm_lora_learning_rate=self.anneal_lm_lora_learning_rate, continue_training=True,
                       anneal_steps=0)


def caption_prompt() -> str:
    """The caption instruction; the same as ``adpo eval``'s default so that caption evaluation needs no flag."""
    from adpo.prompts import EVAL_TASK_PROMPTS

    return EVAL_TASK_PROMPTS["caption"]


# ----------------------------------------------------------------------------------------------- data


class _Tokens:
    """Token ids of the world's chat turns, memoised (a few hundred distinct strings)."""

    def __init__(self, processor, n_image_tokens: int):
        from adpo.world.lvlm import IMAGE_TOKEN, prompt_for

        self.tokenizer = processor.tokenizer
        self.processor = processor
        self.expanded_image = IMAGE_TOKEN * n_image_tokens
        self.image_token = IMAGE_TOKEN
        self.prompt_for = prompt_for
        self.eos = self.tokenizer.eos_token_id
        self._cache: dict[tuple[str, str], list[int]] = {}

    def _ids(self, kind: str, text: str) -> list[int]:
        key = (kind, text)
        if key not in self._cache:
            if kind == "first":  # exactly LlavaView.encode's prompt tokens
                prompt = self.prompt_for(text, self.processor).replace(self.image_token, self.expanded_image)
                ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
            elif kind == "next":  # a later user turn, as the chat template renders it after "<eos>\n"
                ids = self.tokenizer(f"\nUser:{text}\nAssistant:", add_special_tokens=False)["input_ids"]
            else:
                ids = self.tokenizer(answer_text(text), add_special_tokens=False)["input_ids"] + [self.eos]
            self._cache[key] = ids
        return self._cache[key]

    def conversation(self, turns: list[tuple[str, str]]) -> tuple[list[int], list[int]]:
        ids, labels = [], []
        for index, (question, answer) in enumerate(turns):
            prompt = self._ids("first" if index == 0 else "next", question)
            reply = self._ids("answer", answer)
            ids += prompt + reply
            labels += [-100] * len(prompt) + reply
        return ids, labels


def _sample_turns(record: dict, rng: random.Random, turns: int, caption_fraction: float) -> list[tuple[str, str]]:
    if rng.random() < caption_fraction:
        return [(caption_prompt(), record["captions"][0])]
    pairs = list(zip(record["questions"], record["answers"]))
    rng.shuffle(pairs)
    return pairs[:turns]


def _collate(rows: list[tuple[list[int], list[int]]], pad_id: int):
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (ids, lab) in enumerate(rows):  # right padding: positions stay 0..n-1 for the real tokens
        input_ids[i, : len(ids)] = torch.tensor(ids)
        labels[i, : len(lab)] = torch.tensor(lab)
        attention_mask[i, : len(ids)] = 1
    return input_ids, attention_mask, labels


@torch.no_grad()
def tower_features(model, processor, images, batch_size: int = 250, progress: bool = True) -> torch.Tensor:
    """The frozen tower's LLM features ``[N, n_patches, D]`` (what the projector consumes), fp32."""
    from adpo.tower import VisionTower
    from adpo.preprocess import to_pixels

    tower = VisionTower.from_lvlm(model, processor).eval()
    chunks = []
    for start in tqdm(range(0, len(images), batch_size), desc="tower features", disable=not progress, leave=False):
        pixels = to_pixels(list(images[start : start + batch_size]), processor)
        chunks.append(tower.features(pixels).float())
    return torch.cat(chunks)


def alignment_text(objects: list[dict], image_size: int = 64) -> str:
    """The short description whose LM embeddings phase 1 regresses (primary object first, as in the data)."""
    def side(obj: dict) -> str:
        return "left" if obj["x"] < image_size / 2 else "right"

    first = objects[0]
    if len(objects) == 1:
        return f" one {first['color']} {first['shape']}."
    second = objects[1]
    return (f" two: big {first['color']} {first['shape']} {side(first)},"
            f" small {second['color']} {second['shape']} {side(second)}.")


def alignment_targets(model, tokenizer, objects_column, n_tokens: int) -> torch.Tensor:
    """``[N, n_tokens, H]`` LM input embeddings of each image's description, repeated to fill the image slots."""
    embed = model.model.get_input_embeddings()
    rows = []
    for objects in objects_column:
        ids = tokenizer(alignment_text(objects), add_special_tokens=False)["input_ids"]
        rows.append([ids[k % len(ids)] for k in range(n_tokens)])
    with torch.no_grad():
        return embed(torch.tensor(rows)).float()


def align_projector(model, features, targets, config, generator: torch.Generator, progress: bool = True) -> list[float]:
    """Phase 1: MSE (in units of the target RMS) between projector outputs and the description embeddings."""
    projector = model.model.multi_modal_projector
    optimizer = torch.optim.AdamW(projector.parameters(), lr=config.align_learning_rate, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(config.align_steps, 1))
    scale = targets.pow(2).mean().sqrt()
    losses = []
    for _ in tqdm(range(config.align_steps), desc=f"align {config.size}", disable=not progress, leave=False):
        index = torch.randint(len(features), (config.align_batch_size,), generator=generator)
        loss = ((projector(features[index]) - targets[index]) / scale).pow(2).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
    return losses


# ----------------------------------------------------------------------------------------------- model pieces


def answer_loss(model, features: torch.Tensor, input_ids, attention_mask, labels) -> torch.Tensor:
    """Mean CE of the answer tokens with ``features`` (tower outputs) placed at the image tokens.

    The same computation as ``LlavaForConditionalGeneration.forward`` (projector -> masked scatter -> LM),
    but with precomputed tower features and the LM head applied only where a label is predicted.
    """
    inner = model.model
    embeds = inner.get_input_embeddings()(input_ids)
    image_mask = input_ids == model.config.image_token_id
    projected = inner.multi_modal_projector(features).to(embeds.dtype)
    embeds = embeds.masked_scatter(image_mask.unsqueeze(-1), projected)
    hidden = inner.language_model(inputs_embeds=embeds, attention_mask=attention_mask).last_hidden_state
    targets = labels[:, 1:]
    keep = targets != -100
    logits = model.lm_head(hidden[:, :-1][keep]).float()
    return F.cross_entropy(logits, targets[keep])


@torch.no_grad()
def _match_projector_scale(model, features: torch.Tensor, sample_ids: torch.Tensor) -> float:
    """Rescale the projector's last layer so its outputs start at the RMS of the LM's own input embeddings.

    Gemma multiplies token embeddings by sqrt(hidden); SmolLM2 does not: one init cannot suit both.
    """
    inner = model.model
    text_rms = inner.get_input_embeddings()(sample_ids).float().pow(2).mean().sqrt()
    out_rms = inner.multi_modal_projector(features).float().pow(2).mean().sqrt()
    factor = float(text_rms / out_rms)
    inner.multi_modal_projector.linear_2.weight.mul_(factor)
    inner.multi_modal_projector.linear_2.bias.mul_(factor)
    return factor


@torch.no_grad()
def vqa_exact_match(model, processor, dataset, n_questions: int, batch_size: int = 32, progress: bool = True) -> dict:
    """Greedy exact match on the first ``n_questions`` (image, question) pairs, one question per image,
    cycling through question types (as ``adpo eval`` samples them). Uses the core's LlavaView."""
    from adpo.eval.metrics import exact_match
    from adpo.lvlm import LlavaView
    from adpo.preprocess import to_pixels

    view = LlavaView(model, processor)
    items = []
    for index in range(len(dataset)):
        row = dataset[index]
        k = index % len(row["questions"])
        items.append((row["image"], row["questions"][k], row["answers"][k]))
        if len(items) >= n_questions:
            break
    correct = 0
    for start in tqdm(range(0, len(items), batch_size), desc="val VQA", disable=not progress, leave=False):
        chunk = items[start : start + batch_size]
        answers = view.generate(to_pixels([c[0] for c in chunk], processor), [c[1] for c in chunk], max_new_tokens=4)
        correct += sum(exact_match(a, c[2]) for a, c in zip(answers, chunk))
    return {"exact_match": correct / max(len(items), 1), "questions": len(items)}


def add_lm_lora(model, config: ProjectorTrainingConfig, state: dict[str, torch.Tensor] | None = None) -> list:
    """Inject trainable LoRA adapters (peft) into the LM, optionally starting from a saved ``state``.

    Returns the adapter parameters. Dropout is 0 so that a continued run sees the same function it saved.
    """
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict

    language_model = model.model.language_model
    lora = LoraConfig(r=config.lm_lora_rank, lora_alpha=config.lm_lora_alpha, lora_dropout=0.0,
                      target_modules=list(config.lm_lora_targets))
    inject_adapter_in_model(lora, language_model)
    if state is not None:
        missing, unexpected = set_peft_model_state_dict(language_model, state)
        if unexpected or any("lora_" in key for key in missing):
            raise ValueError(f"the saved LM adapter does not fit this LM: unexpected {unexpected[:3]}, "
                             f"missing {[k for k in missing if 'lora_' in k][:3]}")
    parameters = [p for name, p in language_model.named_parameters() if "lora_" in name]
    for parameter in parameters:
        parameter.requires_grad_(True)
    return parameters


def fold_lm_lora(model, config: ProjectorTrainingConfig) -> dict[str, torch.Tensor]:
    """Take the adapters out of the LM and merge them into its weights, exactly as assembly will (fp16 adapter).

    Returns the adapter state to ship (fp16, peft's key layout relative to the LM).
    """
    from peft import get_peft_model_state_dict
    from peft.tuners.tuners_utils import BaseTunerLayer

    language_model = model.model.language_model
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in get_peft_model_state_dict(language_model).items()}
    for name, module in list(language_model.named_modules()):
        if isinstance(module, BaseTunerLayer):
            parent, _, child = name.rpartition(".")
            setattr(language_model.get_submodule(parent), child, module.get_base_layer())
    if hasattr(language_model, "peft_config"):
        del language_model.peft_config
    merge_lm_lora(model, state, config.lm_lora_alpha / config.lm_lora_rank)
    return state


def _lora_settings(config: ProjectorTrainingConfig) -> dict | None:
    if not config.lm_lora_rank:
        return None
    return {"rank": config.lm_lora_rank, "alpha": config.lm_lora_alpha, "targets": list(config.lm_lora_targets)}


# ----------------------------------------------------------------------------------------------- training


def train_projector(
    config: ProjectorTrainingConfig,
    clip_weights_dir: str | os.PathLike | None = None,
    out_dir: str | os.PathLike | None = None,
    clip=None,
    progress: bool = True,
):
    """Train the ``config.size`` LVLM's projector; save it (fp16) + ``training.json`` to ``out_dir/<size>``.

    Returns ``(model, processor, record)``. ``clip`` = ``(CLIPModel, CLIPProcessor)`` overrides the shipped
    WorldCLIP (tests pass a random one).
    """
    from adpo.world.data import load_world_dataset

    if config.size not in SIZES:
        raise ValueError(f"unknown size {config.size!r}; choose one of {sorted(SIZES)}")
    torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    rng = random.Random(config.seed)
    clip_sha256 = None
    if clip is None:
        from adpo.world.clip import WEIGHTS_DIR as CLIP_WEIGHTS_DIR
        from adpo.world.clip import load_world_clip

        clip_dir = Path(clip_weights_dir) if clip_weights_dir is not None else CLIP_WEIGHTS_DIR
        clip_sha256 = sha256_file(clip_dir / "model.safetensors")  # assembly refuses a projector/tower mismatch
        clip = load_world_clip(clip_dir)
    clip_model, clip_processor = clip
    model, processor = build_world_lvlm(config.size, clip_model, clip_processor.image_processor, seed=config.seed)

    train = load_world_dataset("train", n=config.train_images, seed=config.data_seed, progress=progress)
    records = list(train.remove_columns([c for c in train.column_names if c not in ("captions", "questions", "answers", "objects")]))
    features = tower_features(model, processor, train["image"], progress=progress)
    n_image_tokens = features.shape[1]
    tokens = _Tokens(processor, n_image_tokens)
    pad_id = processor.tokenizer.pad_token_id

    for parameter in model.parameters():
        parameter.requires_grad_(False)
    projector = model.model.multi_modal_projector
    for parameter in projector.parameters():
        parameter.requires_grad_(True)
    save_dir = Path(out_dir or WEIGHTS_DIR) / config.size
    previous = _previous_run(save_dir, clip_sha256) if config.continue_training else None
    lora_state = None
    if previous is not None:
        if previous.get("lm_lora") != _lora_settings(config):
            raise ValueError(
                f"the run in {save_dir} used LM LoRA settings {previous.get('lm_lora')}, this config "
                f"{_lora_settings(config)}; continue with the same lm_lora_* settings or train from scratch"
            )
        if config.lm_lora_rank:
            from safetensors.torch import load_file

            lora_state = load_file(save_dir / LM_LORA_FILE)
    lora_parameters = add_lm_lora(model, config, lora_state) if config.lm_lora_rank else []
    if previous is None:
        probe_ids = torch.tensor([tokens.conversation(_sample_turns(records[i], rng, config.turns, 0.0))[0] for i in range(1)])
        scale = _match_projector_scale(model, features[:64], probe_ids[probe_ids != model.config.image_token_id][None])
        align_started = time.time()
        targets = alignment_targets(model, processor.tokenizer, [r["objects"] for r in records], n_image_tokens)
        align_losses = align_projector(model, features, targets, config, torch.Generator().manual_seed(config.seed), progress)
        align_seconds = time.time() - align_started
    else:
        load_projector(model, save_dir / PROJECTOR_FILE)
        # A fresh batch stream: replaying the first run's batches would add no new data.
        rng = random.Random(config.seed * 1_000_003 + previous["steps_run"])

    groups = [{"params": list(projector.parameters()), "lr": config.learning_rate}]
    if lora_parameters:
        groups.append({"params": lora_parameters, "lr": config.lm_lora_learning_rate})
    trainable = [p for group in groups for p in group["params"]]
    optimizer = torch.optim.AdamW(groups, weight_decay=0.0)

    def lr_at(step: int) -> float:
        return min(1.0, (step + 1) / max(config.warmup_steps, 1))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_at)
    losses: list[float] = []
    started = time.time()
    model.train()
    bar = tqdm(range(config.steps), desc=f"projector {config.size}", disable=not progress)
    for step in bar:
        index = [rng.randrange(len(records)) for _ in range(config.batch_size)]
        rows = [tokens.conversation(_sample_turns(records[i], rng, config.turns, config.caption_fraction)) for i in index]
        input_ids, attention_mask, labels = _collate(rows, pad_id)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=config.bf16):
            loss = answer_loss(model, features[index], input_ids, attention_mask, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}", avg=f"{sum(losses[-10:]) / len(losses[-10:]):.3f}")
        if config.max_seconds is not None and time.time() - started > config.max_seconds:
            break
    bar.close()
    train_seconds = time.time() - started
    model.eval()
    for parameter in projector.parameters():
        parameter.requires_grad_(False)
    lm_lora = fold_lm_lora(model, config) if config.lm_lora_rank else None

    record = {
        "training": asdict(config),
        "lm": SIZES[config.size],
        "clip_sha256": clip_sha256,
        "lm_lora": _lora_settings(config),
    }
    if previous is None:
        record |= {
            "projector_init_scale": scale,
            "align_first_loss": align_losses[0] if align_losses else None,
            "align_final_loss": sum(align_losses[-20:]) / max(len(align_losses[-20:]), 1) if align_losses else None,
            "align_wall_seconds": round(align_seconds, 1),
        }
    else:
        keep = ("projector_init_scale", "align_first_loss", "align_final_loss", "align_wall_seconds")
        record |= {key: previous.get(key) for key in keep}
        earlier = previous.get("runs") or [
            _run_summary(previous["training"], previous["steps_run"], previous["wall_seconds"])
            | {"val_vqa": previous.get("val_vqa")}
        ]
        record["runs"] = earlier + [_run_summary(asdict(config), len(losses), round(train_seconds, 1))]
    all_losses = ([] if previous is None else previous["loss_by_step"]) + [round(v, 4) for v in losses]
    record |= {
        "steps_run": len(all_losses),
        "first_loss": all_losses[0] if all_losses else None,
        "final_loss": sum(all_losses[-10:]) / max(len(all_losses[-10:]), 1) if all_losses else None,
        "loss_by_step": all_losses,
        "wall_seconds": round(train_seconds + (0.0 if previous is None else previous["wall_seconds"]), 1),
        "torch_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
    }
    if config.val_questions:
        val = load_world_dataset("val", n=config.val_questions, seed=config.data_seed, progress=progress)
        record["val_vqa"] = vqa_exact_match(model, processor, val, config.val_questions, progress=progress)
    save_projector(model, save_dir, record, lm_lora, _lora_settings(config))
    return model, processor, record


def _run_summary(training: dict, steps_run: int, wall_seconds: float) -> dict:
    """One run of a continued projector (steps, wall time, rates): each continuation may change the rates."""
    keys = ("learning_rate", "lm_lora_learning_rate", "batch_size")
    return {"steps_run": steps_run, "wall_seconds": wall_seconds} | {key: training.get(key) for key in keys}


def _previous_run(save_dir: Path, clip_sha256: str | None) -> dict:
    """The training record of the projector in ``save_dir``, checked to continue from (``continue_training``)."""
    record_path = save_dir / TRAINING_RECORD
    if not (save_dir / PROJECTOR_FILE).is_file() or not record_path.is_file():
        raise FileNotFoundError(
            f"nothing to continue in {save_dir}: it needs {PROJECTOR_FILE} and {TRAINING_RECORD}; "
            "train from scratch (without continue_training / --continue-training) first"
        )
    previous = json.loads(record_path.read_text())
    if previous.get("clip_sha256") != clip_sha256:
        raise ValueError(
            f"the projector in {save_dir} was trained on another WorldCLIP (sha256 {previous.get('clip_sha256')}); "
            "it cannot be continued on this one: train from scratch"
        )
    return previous


def save_projector(model, out_dir: str | os.PathLike, record: dict | None = None,
                   lm_lora: dict[str, torch.Tensor] | None = None, lora_settings: dict | None = None) -> Path:
    """Atomically write the projector (fp16 safetensors), the LM adapter if any, and the training record."""
    from safetensors.torch import save_file

    with atomic_directory(out_dir) as staging:
        save_file(projector_state(model), staging / PROJECTOR_FILE, metadata={"format": "pt"})
        if lm_lora is not None:
            metadata = {"format": "pt", "lora_rank": str(lora_settings["rank"]),
                        "lora_alpha": str(lora_settings["alpha"]), "target_modules": ",".join(lora_settings["targets"])}
            save_file(lm_lora, staging / LM_LORA_FILE, metadata=metadata)
        if record is not None:
            (staging / TRAINING_RECORD).write_text(json.dumps(record, indent=2) + "\n")
    return Path(out_dir)


# ----------------------------------------------------------------------------------------------- everything


@dataclass
class WorldBuildConfig:
    """What ``adpo world build`` rebuilds (every stage is seeded)."""

    out_dir: str | None = None  # default: the package's adpo/world/weights
    stages: list[str] = field(default_factory=lambda: list(STAGES))
    seed: int = 0
    clip: WorldClipTrainingConfig = field(default_factory=WorldClipTrainingConfig)
    small: ProjectorTrainingConfig = field(default_factory=lambda: ProjectorTrainingConfig(size="small"))
    large: ProjectorTrainingConfig = field(default_factory=lambda: ProjectorTrainingConfig(size="large"))


def build_world(out_dir: str | os.PathLike | None = None, stages=STAGES, config: WorldBuildConfig | None = None,
                progress: bool = True) -> dict:
    """Rebuild the shipped weights into ``out_dir`` (default ``adpo/world/weights``) and rewrite the manifest.

    Stages: "clip" (WorldCLIP, :func:`adpo.world.clip.train_world_clip`), "small", "large" (projectors, on the
    WorldCLIP found in ``out_dir/clip``). Returns ``{stage: training record, "wall_seconds": {...}}``.
    """
    config = config or WorldBuildConfig()
    out = Path(out_dir or config.out_dir or WEIGHTS_DIR)
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise ValueError(f"unknown build stages {unknown}; choose from {list(STAGES)}")
    results: dict = {"wall_seconds": {}}
    for stage in STAGES:
        if stage not in stages:
            continue
        started = time.time()
        if stage == "clip":
            clip_config = replace(config.clip, seed=config.seed)
            _, _, record = train_world_clip(out / "clip", config=clip_config, progress=progress)
        else:
            stage_config = replace(getattr(config, stage), size=stage)
            _, _, record = train_projector(stage_config, clip_weights_dir=out / "clip", out_dir=out, progress=progress)
            if stage_config.anneal_steps and not stage_config.continue_training:
                _, _, record = train_projector(stage_config.annealing(), clip_weights_dir=out / "clip", out_dir=out,
                                               progress=progress)
        results[stage] = record
        results["wall_seconds"][stage] = round(time.time() - started, 1)
    write_manifest(out)
    return results
