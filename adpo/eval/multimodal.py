"""Zero-shot classification under text-only and joint (image + text) attacks, beside the protocol's image attacks.

``adpo eval --task zeroshot --attack_modalities image text joint`` adds, to the image-only rows the protocol
computes, two attacks on the class prompt of each sample's true class (the text threat model of
:mod:`adpo.text_attacks`: at most ``text_max_substitutions`` token substitutions, HotFlip-ranked and verified; the
words of every class name are protected, so the attack cannot just rename the class):

* **text**: the clean image, the attacked prompt; one row (the text threat model has no ε).
* **joint**, per ε: image then text — the text attack runs against the worst image the protocol's image attack found
  at that ε (its APGD ensemble, so the joint attack is at least as strong as the image-only one, sample by sample).
  A sample the image attack already broke counts broken without a text attack.

A sample counts robust when the classifier still predicts its class; early stop on misclassification. The
results go into ``report["multimodal"]`` and a side-by-side table in report.md.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from adpo.text_attacks import TextThreatModel, ZeroShotTextCrossEntropy, clip_text_tower, text_attack

MODALITIES = ("image", "text", "joint")


@dataclass
class ZeroShotText:
    """The text side of a zero-shot classifier, as the text attack needs it."""

    text_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    token_embedding: nn.Embedding
    tokenizer: Any
    prompt_ids: torch.Tensor  # [C, L]: the class prompts, tokenised and padded together
    prompt_mask: torch.Tensor
    modules: Sequence[nn.Module]

    @classmethod
    def from_clip(cls, clip, tokenizer, class_names: Sequence[str], template: str) -> "ZeroShotText":
        encoded = tokenizer([template.format(name) for name in class_names], padding=True, return_tensors="pt")
        text_fn, table = clip_text_tower(clip)
        return cls(text_fn, table, tokenizer, encoded["input_ids"], encoded["attention_mask"], (clip,))


def threat_of(config) -> TextThreatModel:
    return TextThreatModel(max_substitutions=config.text_max_substitutions, candidates=config.text_candidates,
                           shortlist=config.text_shortlist, beam_width=config.text_beam_width)


def _attack_prompts(model, text: ZeroShotText, threat: TextThreatModel, allowed: torch.Tensor, images: torch.Tensor,
                    labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(robust [N] bool, adversarial prompt ids [N, L]) for images already in pixel space on the model's device."""
    device = model.device
    with torch.no_grad():
        image_embeddings = model.embed_fn(images.to(device))
    ids, mask = text.prompt_ids.to(device)[labels], text.prompt_mask.to(device)[labels]
    objective = ZeroShotTextCrossEntropy(text.text_fn, text.token_embedding, image_embeddings, model.class_embeddings,
                                         labels.to(device), model.logit_scale, modules=text.modules)
    editable = threat.editable_positions(ids, mask, text.tokenizer, model.class_names)
    result = text_attack(objective, ids, mask, threat, allowed, editable, early_stop=True)
    return ~result.success.cpu(), result.input_ids.cpu()


def multimodal_attacks(config, model, samples, pixels: torch.Tensor, clean: Sequence, runs: dict) -> dict:
    """The text and joint rows (see the module doc); ``runs`` maps each ε label to the protocol's (run, final)."""
    if model.text is None:
        raise ValueError("text and joint attacks need the zero-shot model's text side (build it with clip_model set)")
    threat = threat_of(config)
    allowed = threat.allowed_tokens(model.text.tokenizer, model.class_names)
    labels = torch.tensor([s.label for s in samples])
    clean_correct = torch.tensor([c.scores["accuracy"] > 0 for c in clean])
    started = time.perf_counter()
    modalities = set(config.attack_modalities)
    per_sample: dict[str, list[dict]] = {}
    accuracy: dict[str, float] = {}
    indices = list(range(len(samples)))
    chunks = [indices[i:i + config.batch_size] for i in range(0, len(indices), config.batch_size)]

    def run(name: str, images_for: Callable[[list[int]], torch.Tensor], already_broken: torch.Tensor) -> None:
        robust = torch.zeros(len(samples), dtype=torch.bool)
        prompts: list[str | None] = [None] * len(samples)
        for chunk in tqdm(chunks, desc=f"{name} attack", disable=None if config.progress else True, leave=False):
            todo = [i for i in chunk if not bool(already_broken[i])]
            if not todo:
                continue
            held, adversarial = _attack_prompts(model, model.text, threat, allowed, images_for(todo), labels[todo])
            robust[todo] = held
            decoded = model.text.tokenizer.batch_decode(adversarial, skip_special_tokens=True)
            for i, prompt in zip(todo, decoded):
                prompts[i] = prompt
        accuracy[name] = float(robust.float().mean())
        per_sample[name] = [{"id": s.id, "robust": bool(r), "adversarial_prompt": p}
                            for s, r, p in zip(samples, robust.tolist(), prompts)]

    if "text" in modalities:
        run("text", lambda todo: pixels[todo], ~clean_correct)
    if "joint" in modalities:
        for label, (image_run, final) in runs.items():
            broken = torch.tensor([o.scores["accuracy"] <= 0 for o in final])
            worst = [o.x_adv if o.x_adv is not None else pixels[i].float().cpu() for i, o in enumerate(final)]
            run(f"joint {label}", lambda todo: torch.stack([worst[i] for i in todo]), broken)
    return {
        "text_threat_model": threat.describe() + "; class-name words protected",
        "order": "image then text: the text attack runs against the image attack's worst image at each ε",
        "accuracy": accuracy,
        "image_accuracy": {label: final_accuracy(final) for label, (_, final) in runs.items()},
        "clean_accuracy": float(clean_correct.float().mean()),
        "samples": per_sample,
        "seconds": time.perf_counter() - started,
    }


def final_accuracy(final: Sequence) -> float:
    return sum(o.scores["accuracy"] for o in final) / max(len(final), 1)


def markdown(report: dict) -> str:
    """The side-by-side table: clean, text-only, then image-only and joint per ε (accuracy in %)."""
    section = report["multimodal"]
    columns = [("clean", section["clean_accuracy"])]
    if "text" in section["accuracy"]:
        columns.append(("text", section["accuracy"]["text"]))
    for label, value in section["image_accuracy"].items():
        columns.append((f"image {label}", value))
        if f"joint {label}" in section["accuracy"]:
            columns.append((f"joint {label}", section["accuracy"][f"joint {label}"]))
    head = "| " + " | ".join(name for name, _ in columns) + " |"
    rule = "|" + "---|" * len(columns)
    row = "| " + " | ".join(f"{100 * value:.1f}" for _, value in columns) + " |"
    return "\n".join([
        "## Image, text and joint attacks (zero-shot accuracy, %)",
        "",
        f"Text threat model: {section['text_threat_model']}; joint = {section['order']}.",
        "",
        head, rule, row, "",
    ])
