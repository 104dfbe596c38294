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


def run_as_process(main) -> int:
    """Run a command's ``main()`` as the whole process: return its exit code after leaving the process group.

    A launched (multi-process) run that exits with its gloo/NCCL group still up can abort in the backend's
    teardown after all work is saved (seen as SIGABRT on CPU runs). Only process entry points call this:
    ``adpo run`` calls the stages' ``main`` in-process, and they must keep the group for the next stage.
    """
    code = main()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()  # no rank leaves while another still talks to it
        torch.distributed.destroy_process_group()
    return int(code or 0)
