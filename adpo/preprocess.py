"""From files and PIL images to pixel-space tensors: the one preprocessing path of adpo.

Images become float tensors ``[B, 3, H, W]`` in [0, 1] at the model's resolution, resized and
cropped exactly as the model's image processor does (optionally padded to a square first, as original
LLaVA-1.5 does), but **not normalised** (normalisation happens
inside the model wrappers, so attacks and ε-balls live in pixel space). Because the processor resizes
uint8 images, every value is k/255: a lossless PNG round trip reproduces the tensor exactly.
"""

from __future__ import annotations

import io
import os
from typing import Any, Sequence

import numpy as np
import torch
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError


class ImageLoadError(ValueError):
    """An image that cannot be read; ``reason`` says why (for skip lists in dataset cards)."""

    def __init__(self, source: str, reason: str):
        super().__init__(f"cannot read image {source}: {reason}")
        self.source = source
        self.reason = reason


def _flatten_alpha(image: Image.Image) -> Image.Image:
    # Transparent pixels carry arbitrary colours; composite on white so they look as a viewer shows them.
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def load_rgb(source: str | os.PathLike | bytes | Image.Image | np.ndarray | dict) -> Image.Image:
    """Open an image from a path, bytes, array, PIL image or HF ``{"bytes", "path"}`` dict as RGB.

    L, LA, RGBA, CMYK, I;16, F and P (with or without transparency) are converted; unreadable or corrupt
    files raise :class:`ImageLoadError` naming the file and the reason. A photo's EXIF orientation is applied,
    so the image is upright as a viewer shows it.
    """
    name = "<in-memory image>"
    try:
        if isinstance(source, dict):
            data, path = source.get("bytes"), source.get("path")
            source = data if data is not None else path
        if isinstance(source, np.ndarray):
            array = source
            if array.dtype != np.uint8:
                array = np.clip(array * (255 if array.max() <= 1.0 else 1), 0, 255).astype(np.uint8)
            image = Image.fromarray(array)
        elif isinstance(source, Image.Image):
            image = source
        elif isinstance(source, (bytes, bytearray)):
            image = Image.open(io.BytesIO(source))
        else:
            name = os.fspath(source)
            image = Image.open(name)
        image.load()
        if image.getexif().get(ExifTags.Base.Orientation, 1) != 1:  # cameras store pixels unrotated and record the turn here
            image = ImageOps.exif_transpose(image)
    except FileNotFoundError as error:
        raise ImageLoadError(name, f"file not found ({error.filename})") from error
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise ImageLoadError(name, f"corrupt or unsupported image ({type(error).__name__}: {error})") from error

    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        return _flatten_alpha(image)
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(image, dtype=np.float64)
        peak = array.max() if array.max() > 0 else 1.0
        return Image.fromarray((array / peak * 255).astype(np.uint8)).convert("RGB")
    if image.mode == "F":
        array = np.asarray(image, dtype=np.float64)
        span = array.max() - array.min() or 1.0
        return Image.fromarray(((array - array.min()) / span * 255).astype(np.uint8)).convert("RGB")
    return image.convert("RGB")


def image_processor_of(processor: Any) -> Any:
    """The image processor inside a (multimodal) processor, or the object itself."""
    return getattr(processor, "image_processor", processor)


def _expand_to_square(image: Image.Image, fill: tuple[int, int, int]) -> Image.Image:
    """``image`` centred on a square canvas of colour ``fill`` whose side is the image's longer side."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    canvas = Image.new("RGB", (side, side), fill)
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas


def to_pixels(images: Sequence[Any] | Any, processor: Any, pad_to_square: bool = False) -> torch.Tensor:
    """Resize and crop ``images`` as ``processor`` does and return float pixels on the k/255 grid, ``[B, 3, H, W]``.

    ``processor`` is an image processor or a processor holding one (e.g. ``LlavaProcessor``). llava-hf's
    processors resize the shorter side and centre-crop (a 640×427 image keeps 67 % of its width);
    ``pad_to_square`` first pads each image to a square in the processor's mean colour, as original
    LLaVA-1.5 does (its ``expand2square``), so the whole image is seen.
    """
    if not isinstance(images, (list, tuple)):
        images = [images]
    if len(images) == 0:
        raise ValueError("to_pixels needs at least one image")
    rgb = [load_rgb(image) for image in images]
    image_processor = image_processor_of(processor)
    if pad_to_square:
        # LLaVA-1.5's colour: the normalisation mean, truncated to 8 bits, so the bands normalise to about zero.
        fill = tuple(int(255 * channel) for channel in image_processor.image_mean)
        rgb = [_expand_to_square(image, fill) for image in rgb]
    out = image_processor(images=rgb, do_normalize=False, do_rescale=True, return_tensors="pt")
    # Snap to the 8-bit grid: PIL-backed processors already return k/255, but torchvision-backed ("fast")
    # ones resize in float. On the grid, clean images and attacks saved as PNG round-trip exactly.
    return (out["pixel_values"].float().clamp(0.0, 1.0) * 255).round_() / 255


def to_uint8_images(pixels: torch.Tensor) -> list[Image.Image]:
    """Pixel tensors in [0, 1] to PIL RGB images (rounding to the nearest k/255)."""
    array = (pixels.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in array]
