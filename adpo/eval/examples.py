"""Example images of a report: a few clean / adversarial pairs with their outputs, as PNG beside report.json."""

from __future__ import annotations

from pathlib import Path

import torch

from adpo.io import atomic_file


def save_examples(samples, pixels, clean, run_and_final, label, task, count, out_dir: Path) -> list[dict]:
    """Lossless PNGs of clean and adversarial images for the samples whose output the attack changed most."""
    from adpo.preprocess import to_uint8_images

    run, final = run_and_final
    changed = [i for i, outcome in enumerate(final) if outcome.x_adv is not None and outcome.output != clean[i].output]
    # Broken samples first, then by how far the score fell.
    changed.sort(key=lambda i: (not task.broken(final[i].scores), final[i].scores[task.primary] - clean[i].scores[task.primary]))
    examples = []
    safe_label = label.replace("/", "-")
    for i in changed[:count]:
        clean_image, adversarial_image = to_uint8_images(torch.stack([pixels[i].float().cpu(), final[i].x_adv.float()]))
        folder = out_dir / "examples"
        folder.mkdir(parents=True, exist_ok=True)
        stem = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in samples[i].id)
        clean_path, adversarial_path = folder / f"{stem}_clean.png", folder / f"{stem}_{safe_label}.png"
        _save_png(clean_image, clean_path)
        _save_png(adversarial_image, adversarial_path)
        examples.append({
            "id": samples[i].id,
            "eps_label": label,
            "clean_image": str(clean_path.relative_to(out_dir)),
            "adversarial_image": str(adversarial_path.relative_to(out_dir)),
            "prompt": samples[i].prompt,
            "clean_output": clean[i].output,
            "adversarial_output": final[i].output,
        })
    return examples


def _save_png(image, path: Path) -> None:
    with atomic_file(path) as temporary:
        image.save(temporary, format="PNG")
