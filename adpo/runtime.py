"""Facts about the processes a run is launched in, shared by every trainer."""

from __future__ import annotations

import os

import torch


def has_accelerator() -> bool:
    """Whether torch sees a GPU (or another accelerator)."""
    accelerator = getattr(torch, "accelerator", None)
    return bool(accelerator.is_available()) if accelerator is not None else torch.cuda.is_available()


def needs_cpu_process_group() -> bool:
    """Several processes launched (accelerate/torchrun) on a machine without an accelerator.

    Trainer's processes join a (gloo) process group only with ``use_cpu``; without it each would train
    alone on all the data, so trainer configs switch ``use_cpu`` on when this is true.
    """
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and not has_accelerator()
