"""AdPO's two objectives as pure tensor functions (AdPO, arXiv 2504.01735).

Notation: x is the clean image, x_adv its adversarial version, q the prompt, y_w the answer the
original model gives on x (chosen), y_l the answer it gives on x_adv (rejected).

* **PIO** (preferred image optimisation) is DPO between the chosen answer scored on the *clean*
  image and the rejected answer scored on the *adversarial* image::

      h = β·[log π_θ(y_w|x,q) − log π_ref(y_w|x,q)] − β·[log π_θ(y_l|x_adv,q) − log π_ref(y_l|x_adv,q)]
      PIO = mean_batch  ℓ(h)            (ℓ(h) = −log σ(h) for the default ``sigmoid`` loss)

  Other DPO loss shapes (TRL's names) are available through ``loss_type``.

* **AIO** (adversarial image optimisation) is a probability-weighted SFT of y_w on x_adv::

      AIO = mean_batch  − Σ_t sg(p_θ(y_w,t | y_w,<t, x_adv, q)) · log p_θ(y_w,t | y_w,<t, x_adv, q)

  where sg is stop-gradient. The sum runs over the answer tokens only (mask), the mean over the
  pairs of the batch.

Sequence log-probabilities are **sums** over the answer tokens (as in DPO); losses are **means**
over the batch. The trainer combines them as ``PIO + λ·AIO``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

#: DPO loss shapes that make sense for PIO (TRL's names). Losses that sort the batch (aot), need
#: extra hyper-parameters (discopop) or duplicate AIO (sft) are left out.
PIO_LOSS_TYPES: tuple[str, ...] = (
    "sigmoid",
    "hinge",
    "ipo",
    "robust",
    "exo_pair",
    "bco_pair",
    "nca_pair",
    "sigmoid_norm",
    "apo_zero",
    "apo_down",
    "sppo_hard",
)
_LENGTH_NORMALISED = ("ipo", "sigmoid_norm")


@dataclass
class PIOOutput:
    loss: torch.Tensor  # scalar: mean over the batch of the per-pair losses
    per_pair: torch.Tensor  # [B]
    chosen_rewards: torch.Tensor  # [B] β·(log π_θ − log π_ref) of y_w on x, detached
    rejected_rewards: torch.Tensor  # [B] β·(log π_θ − log π_ref) of y_l on x_adv, detached


@dataclass
class AIOOutput:
    loss: torch.Tensor  # scalar: mean over the batch
    per_sample: torch.Tensor  # [B]: −Σ_t sg(p_t)·log p_t


def sequence_logps(per_token_logps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum of the per-token log-probabilities over the answer tokens: ``[B, T], [B, T] -> [B]``."""
    if per_token_logps.shape != mask.shape:
        raise ValueError(f"per_token_logps {tuple(per_token_logps.shape)} and mask {tuple(mask.shape)} must match")
    return (per_token_logps * mask.to(per_token_logps.dtype)).sum(dim=-1)


def pio_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
) -> PIOOutput:
    """PIO for one batch of sequence log-probs (each ``[B]``; chosen on x, rejected on x_adv).

    ``chosen_lengths`` / ``rejected_lengths`` (answer token counts, ``[B]``) are needed by the
    length-normalised shapes ``ipo`` and ``sigmoid_norm``.
    """
    if loss_type not in PIO_LOSS_TYPES:
        raise ValueError(f"unknown PIO loss_type {loss_type!r}; use one of {PIO_LOSS_TYPES}")
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if loss_type in _LENGTH_NORMALISED and (chosen_lengths is None or rejected_lengths is None):
        raise ValueError(f"loss_type {loss_type!r} needs chosen_lengths and rejected_lengths (answer token counts)")

    chosen_logratios = policy_chosen_logps - ref_chosen_logps
    rejected_logratios = policy_rejected_logps - ref_rejected_logps
    delta = chosen_logratios - rejected_logratios
    h = beta * delta

    if loss_type == "sigmoid":
        per_pair = -F.logsigmoid(h)
    elif loss_type == "hinge":
        per_pair = torch.relu(1 - h)
    elif loss_type == "ipo":
        # IPO on per-token averages, so that β is comparable across answer lengths (as TRL does)
        ipo_delta = chosen_logratios / chosen_lengths.clamp(min=1) - rejected_logratios / rejected_lengths.clamp(min=1)
        per_pair = (ipo_delta - 1 / (2 * beta)) ** 2
    elif loss_type == "robust":
        if not 0.0 <= label_smoothing < 0.5:
            raise ValueError(f"robust loss needs 0 <= label_smoothing < 0.5, got {label_smoothing}")
        per_pair = (
            -(1 - label_smoothing) * F.logsigmoid(h) + label_smoothing * F.logsigmoid(-h)
        ) / (1 - 2 * label_smoothing)
    elif loss_type == "exo_pair":
        if not 0.0 < label_smoothing < 1.0:
            raise ValueError(f"exo_pair needs 0 < label_smoothing < 1 (the EXO paper uses 1e-3), got {label_smoothing}")
        log_pw, log_pl = math.log1p(-label_smoothing), math.log(label_smoothing)
        per_pair = torch.sigmoid(h) * (F.logsigmoid(h) - log_pw) + torch.sigmoid(-h) * (F.logsigmoid(-h) - log_pl)
    elif loss_type == "bco_pair":
        per_pair = -F.logsigmoid(beta * chosen_logratios) - F.logsigmoid(-beta * rejected_logratios)
    elif loss_type == "nca_pair":
        per_pair = (
            -F.logsigmoid(beta * chosen_logratios)
            - 0.5 * F.logsigmoid(-beta * chosen_logratios)
            - 0.5 * F.logsigmoid(-beta * rejected_logratios)
        )
    elif loss_type == "sigmoid_norm":
        norm_delta = chosen_logratios / chosen_lengths.clamp(min=1) - rejected_logratios / rejected_lengths.clamp(min=1)
        per_pair = -F.logsigmoid(beta * norm_delta)
    elif loss_type == "apo_zero":
        per_pair = (1 - torch.sigmoid(beta * chosen_logratios)) + torch.sigmoid(beta * rejected_logratios)
    elif loss_type == "apo_down":
        per_pair = torch.sigmoid(beta * chosen_logratios) + (1 - torch.sigmoid(h))
    else:  # sppo_hard
        per_pair = (chosen_logratios - 0.5 / beta) ** 2 + (rejected_logratios + 0.5 / beta) ** 2

    return PIOOutput(
        loss=per_pair.mean(),
        per_pair=per_pair,
        chosen_rewards=(beta * chosen_logratios).detach(),
        rejected_rewards=(beta * rejected_logratios).detach(),
    )


def aio_loss(per_token_logps: torch.Tensor, mask: torch.Tensor) -> AIOOutput:
    """AIO from the per-token log-probs of y_w on x_adv (``[B, T]``) and the answer-token mask (``[B, T]``).

    The weight p_t = exp(log p_t) is detached (stop-gradient): the gradient is Σ_t p_t·∇(−log p_t),
    an SFT that leans on the tokens the model already finds likely.
    """
    if per_token_logps.shape != mask.shape:
        raise ValueError(f"per_token_logps {tuple(per_token_logps.shape)} and mask {tuple(mask.shape)} must match")
    weights = per_token_logps.detach().exp()
    per_sample = -(weights * per_token_logps * mask.to(per_token_logps.dtype)).sum(dim=-1)
    return AIOOutput(loss=per_sample.mean(), per_sample=per_sample)
