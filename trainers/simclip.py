"""Sim-CLIP (Hossain & Imteaj, 2024): adversarial fine-tuning by cosine similarity to the clean view.

    min_θ  E_x  1 − cos(φ_θ(x'), stopgrad(φ_θ(x))),   x' = PGD maximising ‖φ_θ(x') − φ_θ(x)‖²₂ in B(x, ε)

Unlike FARE the target is the *current* encoder's clean embedding, with the gradient stopped on the
clean branch (the Siamese, SimSiam-style collapse guard); the cosine ignores embedding norms. For
``embedding: llm`` the cosine is taken per patch token and averaged.

    accelerate launch -m trainers.simclip --config configs/simclip/world.yaml
    adpo train simclip --config configs/simclip/world.yaml
"""

from __future__ import annotations

import sys
from dataclasses import dataclass


import torch

from adpo.errors import parse_config
from adpo.losses.encoder import simclip_loss
from adpo.objectives import EmbeddingDistance
from trainers.encoder_trainer import (
    EncoderAdversarialTrainer,
    EncoderTrainingConfig,
    build_tower_embedding,
    load_encoder_for_training,
    load_training_images,
    train_and_save,
)


@dataclass
class SimClipConfig(EncoderTrainingConfig):
    """Sim-CLIP options: everything is shared (see :class:`EncoderTrainingConfig`)."""


class SimClipTrainer(EncoderAdversarialTrainer):
    method = "simclip"
    zero_gradient_at_clean = True
    objective_description = (
        "min_theta E_x 1 - cos(phi_theta(x'), stopgrad(phi_theta(x))); "
        "x' = PGD maximising ||phi_theta(x') - phi_theta(x)||_2^2 in B(x,eps)"
    )

    def prepare_batch(self, module, inputs):
        with torch.no_grad():  # the stop-gradient clean branch
            return {"clean": module(inputs["pixel_values"])}

    def attack_objective(self, module, inputs, context):
        return EmbeddingDistance(module, context["clean"], modules=(module,))

    def adversarial_loss(self, embedding, inputs, context):
        return simclip_loss(embedding, context["clean"])


def build_trainer(config: SimClipConfig, train_dataset=None) -> SimClipTrainer:
    loaded = load_encoder_for_training(config)
    model = build_tower_embedding(loaded, config.embedding)
    if train_dataset is None:
        train_dataset = load_training_images(config)
    return SimClipTrainer(model, config, train_dataset=train_dataset, image_processor=loaded.image_processor,
                          source=loaded.record)


def main(argv: list[str] | None = None) -> int:
    (config,) = parse_config([SimClipConfig], argv, prog="adpo train simclip")
    out = train_and_save(build_trainer(config))
    print(f"Sim-CLIP encoder written to {out}")
    return 0


if __name__ == "__main__":
    from adpo.runtime import run_as_process

    sys.exit(run_as_process(main))
