"""The threat model: where adversarial images may live.

Every attack, every adversarial trainer and every evaluation in adpo uses this one module, so that
"ε = 2/255" means the same thing everywhere:

* images are float tensors ``[B, 3, H, W]`` in **pixel space [0, 1]** (normalisation happens inside the
  model wrappers of :mod:`adpo.tower`, never here);
* an adversarial image ``x'`` is admissible iff ``‖x' − x‖_p ≤ ε`` per sample and ``0 ≤ x' ≤ 1``;
* the attack state is fp32 whatever the model's dtype.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch

from adpo.plugins import named_radius, plugin_radius_hint

Norm = Literal["linf", "l2"]
NORMS: tuple[str, ...] = ("linf", "l2")

# Admissibility is checked up to this slack: fp32 round-off of (x + δ) − x, not a loosening of ε.
_TOLERANCE = 1e-6


# The one way every config writes a radius or a step size (adpo pairs, the trainers, adpo eval, adpo transfer).
EPS_SYNTAX = "a fraction like 2/255, a number below 1 like 0.0078, or a whole number of 255ths like 2"


def parse_eps(value: float | int | str) -> float:
    """ε (or a step size) in [0,1] pixel units, written as a fraction (``"2/255"``), a number below 1 (``0.0078``), a
    whole number of 255ths (``2``) or a plugin's named radius (:func:`adpo.plugins.named_radius`, e.g. the bundled
    world's working ε).

    A number ≥ 1 that is not whole (``1.5``) is refused: it is neither pixels nor 255ths. Raises ValueError for
    anything that is not one of these forms; :func:`parse_radius` adds the range check a config needs.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError(f"{value!r} is not a radius; write {EPS_SYNTAX}")
    if isinstance(value, str):
        text = value.strip()
        named = named_radius(text)
        if named is not None:
            return named
        if "/" in text:
            numerator, _, denominator = text.partition("/")
            top, bottom = _number(numerator, value), _number(denominator, value)
            if bottom == 0 or not math.isfinite(top / bottom):
                raise ValueError(f"{value!r} is not a finite fraction; write {EPS_SYNTAX}")
            return top / bottom
        value = _number(text, value)
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{value!r} is not a finite number; write {EPS_SYNTAX}")
    if value < 1.0:
        return value
    # Whole numbers ≥ 1 are 255ths: nobody attacks with ε ≥ 1 in [0,1] pixel space.
    if not value.is_integer():
        raise ValueError(f"{value:g} is neither below 1 (pixels) nor a whole number of 255ths; write {EPS_SYNTAX}")
    return value / 255.0


def _number(text: str, value: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"{value!r} is not a number; write {EPS_SYNTAX}") from None


def parse_radius(value: float | int | str, key: str, norm: str = "linf") -> float:
    """``value`` by :func:`parse_eps`, checked as a config's radius or step size: > 0, and ≤ 1 for the ℓ∞ norm (a
    larger ℓ∞ ball holds every image). Raises :class:`adpo.errors.UsageError` naming ``key``, the value and the fix."""
    from adpo.errors import UsageError

    try:
        radius = parse_eps(value)
    except ValueError as error:
        raise UsageError(f"{key}={error}") from None  # each message of parse_eps starts with the value
    if radius <= 0 or (norm == "linf" and radius > 1):
        bound = "(0, 1]" if norm == "linf" else "> 0"
        raise UsageError(f"{key}={value!r} is {radius:.4g}, outside {bound} in [0,1] pixel units; write {EPS_SYNTAX}")
    return radius


def check_images(x: torch.Tensor, name: str = "images") -> None:
    """Raise a ValueError unless ``x`` is a float ``[B, C, H, W]`` tensor in [0, 1]."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape [B, 3, H, W], got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(
            f"{name} must have shape [B, C, H, W], got {tuple(x.shape)}; "
            "add a batch dimension with x.unsqueeze(0) for a single image"
        )
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a float tensor in [0, 1], got dtype {x.dtype}; divide uint8 pixels by 255")
    lo, hi = float(x.min()), float(x.max())
    if lo < -_TOLERANCE or hi > 1 + _TOLERANCE:
        raise ValueError(
            f"{name} must lie in pixel space [0, 1], found values in [{lo:.4f}, {hi:.4f}]; pass un-normalised "
            "pixels (adpo.preprocess.to_pixels) — normalisation happens inside the model wrapper"
        )


@dataclass(frozen=True)
class ThreatModel:
    """An ℓ∞ or ℓ2 ball of radius ``eps`` around each clean image, intersected with [0, 1].

    ``step_size`` defaults to ε/4 (so 10 PGD steps can travel 2.5 ε, the usual margin);
    ``random_start`` draws the first iterate uniformly from the ball.
    """

    norm: Norm = "linf"
    eps: float = 2 / 255
    step_size: float | None = None
    random_start: bool = True

    def __post_init__(self) -> None:
        if self.norm not in NORMS:
            raise ValueError(f"unknown norm {self.norm!r}; use one of {NORMS}")
        if not math.isfinite(self.eps) or self.eps < 0:
            raise ValueError(f"eps must be a finite number >= 0, got {self.eps}")
        if self.step_size is not None and (not math.isfinite(self.step_size) or self.step_size <= 0):
            raise ValueError(f"step_size must be > 0 (or None for eps/4), got {self.step_size}")

    @property
    def alpha(self) -> float:
        """The step size actually used."""
        return self.step_size if self.step_size is not None else self.eps / 4

    def describe(self) -> str:
        eps = f"{self.eps * 255:g}/255" if self.norm == "linf" else f"{self.eps:g}"
        return f"{self.norm} eps={eps} step={self.alpha:.3g} random_start={self.random_start}"

    # --- geometry -----------------------------------------------------------------------------------
    def distance(self, x_adv: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Per-sample distance ‖x_adv − x‖ in this model's norm, shape [B]."""
        delta = (x_adv.float() - x.float()).flatten(1)
        if self.norm == "linf":
            return delta.abs().amax(dim=1)
        return delta.norm(p=2, dim=1)

    def contains(self, x_adv: torch.Tensor, x: torch.Tensor, tolerance: float = _TOLERANCE) -> torch.Tensor:
        """Boolean [B]: each adversarial image lies in the ball and in [0, 1]."""
        in_ball = self.distance(x_adv, x) <= self.eps + tolerance
        flat = x_adv.flatten(1)
        in_box = (flat.amin(dim=1) >= -tolerance) & (flat.amax(dim=1) <= 1 + tolerance)
        return in_ball & in_box

    def project(self, x_adv: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Project onto the ball around ``x`` intersected with [0, 1].

        Projecting onto the ball first and clipping to the box second is exact here: the clip only
        shrinks |δ_i| coordinate-wise because x itself lies in the box, so the result stays in the ball.
        """
        delta = x_adv - x
        if self.norm == "linf":
            delta = delta.clamp(-self.eps, self.eps)
        else:
            norms = delta.flatten(1).norm(p=2, dim=1).clamp_min(1e-12)
            factor = (self.eps / norms).clamp(max=1.0).view(-1, *([1] * (delta.dim() - 1)))
            delta = delta * factor
        return (x + delta).clamp(0.0, 1.0)

    def random_init(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """A starting point: uniform in the ball when ``random_start``, else ``x`` itself."""
        if not self.random_start or self.eps == 0:
            return x.clone()
        if self.norm == "linf":
            noise = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype) * 2 - 1
            delta = noise * self.eps
        else:
            direction = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            direction = direction / direction.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
            # Radius ∝ U^(1/d) would be uniform in volume; in high dimension that is ≈ ε, so use U·ε
            # to also start near the centre sometimes (as common ℓ2 PGD implementations do).
            radius = torch.rand(x.shape[0], generator=generator, device=x.device, dtype=x.dtype) * self.eps
            delta = direction * radius.view(-1, 1, 1, 1)
        return self.project(x + delta, x)

    def steepest_step(self, grad: torch.Tensor) -> torch.Tensor:
        """The unit-size ascent direction for this norm (sign for ℓ∞, normalised gradient for ℓ2)."""
        if self.norm == "linf":
            return grad.sign()
        norms = grad.flatten(1).norm(p=2, dim=1).clamp_min(1e-12)
        return grad / norms.view(-1, *([1] * (grad.dim() - 1)))

    def step(self, x_adv: torch.Tensor, grad: torch.Tensor, x: torch.Tensor, step_size: float | torch.Tensor | None = None) -> torch.Tensor:
        """One projected ascent step of size ``step_size`` (default :attr:`alpha`)."""
        size = self.alpha if step_size is None else step_size
        if isinstance(size, torch.Tensor):
            size = size.view(-1, *([1] * (x_adv.dim() - 1)))
        return self.project(x_adv + size * self.steepest_step(grad), x)

    def quantize(self, x_adv: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``x_adv`` moved onto the k/255 grid of the clean image ``x`` (itself on that grid), still admissible.

        This is how adversarial images are stored (uint8 PNG). Rounding to the nearest level is tried first;
        a sample that rounding pushes out of the ball (ℓ2, or an ε that is not a whole number of 255ths)
        rounds every coordinate of δ toward zero instead, which only shrinks |δ| and so stays admissible.
        """
        levels = (x.float() * 255).round()
        delta = x_adv.float() * 255 - levels
        rounded = (levels + delta.round()).clamp(0, 255) / 255
        truncated = (levels + delta.trunc()).clamp(0, 255) / 255
        inside = self.contains(rounded, levels / 255)
        return torch.where(inside.view(-1, *([1] * (x.dim() - 1))), rounded, truncated)


# ----------------------------------------------------------------------------------------------------
# The attack settings of a stage's config
# ----------------------------------------------------------------------------------------------------
# Keys the stages used before ThreatArguments: still read, with a deprecation warning naming the new key.
DEPRECATED_THREAT_KEYS = {"eps": "attack_eps", "norm": "attack_norm", "steps": "attack_steps",
                          "step_size": "attack_step_size", "random_start": "attack_random_start"}


@dataclass
class ThreatArguments:
    """The attack a stage runs, with the same keys in every stage's config (``adpo pairs``, every trainer).

    A stage's config dataclass inherits these fields, as TRL's configs inherit ``TrainingArguments``, and may change a
    default by declaring the field again (the trainers attack at 2/255 by default, pair generation at the model's
    plugin radius). ``adpo eval`` sweeps several radii under the same key names. Validation
    (:meth:`check_threat`) and the :class:`ThreatModel` (:meth:`threat_model`) are written here once.
    """

    attack_norm: str = field(default="linf", metadata={"help": "Threat-model norm: linf or l2."})
    attack_eps: str | None = field(default=None, metadata={"help": f"Radius in [0,1] pixels: {EPS_SYNTAX}"
                                                                   f"{plugin_radius_hint()}."})
    attack_steps: int = field(default=10, metadata={"help": "PGD steps (>= 1)."})
    attack_step_size: str | None = field(default=None, metadata={"help": "PGD step size (same syntax as attack_eps); "
                                                                         "default: attack_eps / 4."})
    attack_random_start: bool = field(default=True, metadata={"help": "Start PGD uniformly in the ball."})
    attack_momentum: float = field(default=0.0, metadata={"help": "PGD momentum on mean-|g|-normalised gradients "
                                                                  "(FARE's training attack uses 0.9); 0 = plain PGD."})

    def check_threat(self) -> None:
        """Raise :class:`adpo.errors.UsageError` naming the first attack setting that cannot be used; radii a YAML file
        gave as numbers are kept as the strings a config records."""
        from adpo.errors import UsageError

        for key in ("attack_eps", "attack_step_size"):
            if getattr(self, key) is not None:
                setattr(self, key, str(getattr(self, key)))

        if self.attack_norm not in NORMS:
            raise UsageError(f"attack_norm={self.attack_norm!r}; use one of {NORMS}")
        for key in ("attack_eps", "attack_step_size"):
            if getattr(self, key) is not None:
                parse_radius(getattr(self, key), key, self.attack_norm)
        if self.attack_steps < 1:
            raise UsageError(f"attack_steps={self.attack_steps}; must be >= 1")
        if not 0 <= self.attack_momentum < 1:
            raise UsageError(f"attack_momentum={self.attack_momentum}; must be in [0, 1)")

    def threat_model(self, default_eps: float | None = None) -> ThreatModel:
        """The ball these settings describe; ``default_eps`` (pixels) when ``attack_eps`` is unset."""
        from adpo.errors import UsageError

        if self.attack_eps is not None:
            eps = parse_radius(self.attack_eps, "attack_eps", self.attack_norm)
        elif default_eps is not None:
            eps = default_eps
        else:
            raise UsageError(f"attack_eps is required: {EPS_SYNTAX}")
        step_size = None if self.attack_step_size is None else parse_radius(self.attack_step_size, "attack_step_size",
                                                                              self.attack_norm)
        return ThreatModel(norm=self.attack_norm, eps=eps, step_size=step_size, random_start=self.attack_random_start)
