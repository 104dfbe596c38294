"""PNG plots for evaluation reports: metric vs epsilon for several models, and example panels."""

from __future__ import annotations

import os
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: reports are written on servers and in CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from adpo.io import atomic_file  # noqa: E402


@dataclass
class Curve:
    """One model's metric at each epsilon (epsilon 0 = clean)."""

    label: str
    eps: Sequence[float]
    values: Sequence[float]


@dataclass
class ExamplePanel:
    """One row of the example figure: the clean and adversarial image with both outputs."""

    clean_image: np.ndarray  # H x W x 3, uint8 or float in [0, 1]
    adversarial_image: np.ndarray
    prompt: str
    clean_output: str
    adversarial_output: str
    title: str = ""


def _save(fig, path: str | os.PathLike) -> Path:
    """Atomic PNG write: render to a temporary file beside the target, then rename."""
    try:
        with atomic_file(path) as temporary:
            fig.savefig(temporary, format="png", dpi=120, bbox_inches="tight")
    finally:
        plt.close(fig)
    return Path(path)


def plot_metric_vs_eps(curves: Sequence[Curve], path: str | os.PathLike, metric_label: str, title: str = "") -> Path:
    """Line chart of a metric (in %) against epsilon (in units of 1/255) with one line per model."""
    if not curves:
        raise ValueError("plot_metric_vs_eps needs at least one curve.")
    fig, ax = plt.subplots(figsize=(6.0, 4.0))
    for curve in curves:
        order = np.argsort(np.asarray(curve.eps, dtype=float))
        xs = np.asarray(curve.eps, dtype=float)[order] * 255.0
        ys = np.asarray(curve.values, dtype=float)[order]
        ax.plot(xs, ys, marker="o", label=curve.label)
    ax.set_xlabel("ε (×1/255, 0 = clean)")
    ax.set_ylabel(metric_label)
    top = ax.get_ylim()[1]
    ax.set_ylim(-0.03 * top, top)  # markers at 0 stay visible
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    if title:
        ax.set_title(title)
    return _save(fig, path)


def _as_float_image(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    return image.astype(np.float32) / 255.0 if image.dtype == np.uint8 else image.astype(np.float32)


def _wrap(text: str, width: int = 38) -> str:
    return "\n".join(textwrap.wrap(text, width)) or "(empty)"


def plot_examples(panels: Sequence[ExamplePanel], path: str | os.PathLike) -> Path:
    """Grid with one row per example: clean image, adversarial image, amplified perturbation, texts."""
    if not panels:
        raise ValueError("plot_examples needs at least one example.")
    fig, axes = plt.subplots(len(panels), 4, figsize=(13.0, 3.2 * len(panels)), squeeze=False)
    for row, panel in zip(axes, panels):
        clean = _as_float_image(panel.clean_image)
        adversarial = _as_float_image(panel.adversarial_image)
        perturbation = adversarial - clean
        scale = max(float(np.abs(perturbation).max()), 1e-12)
        row[0].imshow(np.clip(clean, 0, 1))
        row[0].set_title("clean" + (f" — {panel.title}" if panel.title else ""), fontsize="small")
        row[1].imshow(np.clip(adversarial, 0, 1))
        row[1].set_title("adversarial", fontsize="small")
        # The perturbation is invisible at working epsilons; rescale it to the full range to show it.
        row[2].imshow(np.clip(0.5 + 0.5 * perturbation / scale, 0, 1))
        row[2].set_title(f"perturbation (max |δ| = {scale * 255:.1f}/255)", fontsize="small")
        text = (
            f"prompt: {_wrap(panel.prompt)}\n\n"
            f"clean: {_wrap(panel.clean_output)}\n\n"
            f"adversarial: {_wrap(panel.adversarial_output)}"
        )
        row[3].text(0.0, 1.0, text, va="top", ha="left", fontsize="small", family="monospace", wrap=True)
        for ax in row:
            ax.set_xticks([])
            ax.set_yticks([])
        row[3].axis("off")
    fig.tight_layout()
    return _save(fig, path)
