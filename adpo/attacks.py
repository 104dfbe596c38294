"""PGD and APGD over any per-sample objective, inside one :class:`~adpo.threat.ThreatModel`.

Both attacks are batched, keep their state in fp32 whatever the model's dtype, run the objective's
modules in eval mode with frozen parameters (restored afterwards, so no parameter gradient ever
accumulates), and stop early per sample once the objective reports success: finished samples leave
the batch, so a batch that breaks quickly costs little.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from adpo.objectives import Objective
from adpo.threat import ThreatModel, check_images


@dataclass
class AttackResult:
    """What an attack returns.

    x_adv: the adversarial images (fp32, inside the threat model's ball and [0, 1]).
    values: the objective at ``x_adv`` per sample (``None`` when PGD ran with ``keep_best=False``, where
        the last iterate is returned without spending one more forward pass to score it).
    success: per sample, whether the objective reported success at ``x_adv`` (all False when it cannot tell).
    steps_run: per sample, how many gradient steps were spent on it.
    """

    x_adv: torch.Tensor
    values: torch.Tensor | None
    success: torch.Tensor
    steps_run: torch.Tensor


@contextlib.contextmanager
def attack_mode(modules: Sequence[nn.Module]) -> Iterator[None]:
    """Eval mode and frozen parameters for the duration of an attack; previous state restored after."""
    saved_training = [(module, module.training) for module in modules]
    saved_grad = [(p, p.requires_grad) for module in modules for p in module.parameters()]
    try:
        for module in modules:
            module.eval()
        for parameter, _ in saved_grad:
            parameter.requires_grad_(False)
        yield
    finally:
        for parameter, flag in saved_grad:
            parameter.requires_grad_(flag)
        for module, flag in saved_training:
            module.train(flag)


def _value_and_grad(
    objective: Objective, x: torch.Tensor, need_grad: bool = True
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    x = x.detach().requires_grad_(need_grad)
    with torch.set_grad_enabled(need_grad):
        evaluation = objective.evaluate(x)
        values = evaluation.values
        if values.shape != (x.shape[0],):
            raise ValueError(f"objective must return one value per sample, shape ({x.shape[0]},), got {tuple(values.shape)}")
        grad = torch.autograd.grad(values.float().sum(), x)[0].detach() if need_grad else None
    success = evaluation.success.detach() if evaluation.success is not None else None
    return values.detach().float(), success, grad


def _prepare(x: torch.Tensor, steps: int) -> torch.Tensor:
    check_images(x)
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    return x.detach().float()


def _progress(total: int, enabled: bool, name: str):
    return tqdm(total=total, desc=name, disable=not enabled, leave=False, unit="step")


def pgd(
    objective: Objective,
    x: torch.Tensor,
    threat: ThreatModel,
    steps: int,
    *,
    momentum: float = 0.0,
    keep_best: bool = False,
    early_stop: bool = True,
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> AttackResult:
    """Projected gradient ascent on ``objective`` from a (random) start in the ball.

    ``momentum`` > 0 accumulates gradients normalised by their mean absolute value per sample
    (the momentum PGD of FARE's training code); 0 gives plain PGD. With ``keep_best`` the best iterate
    seen is returned (evaluation), otherwise the last one (adversarial training, as in FARE and TeCoA).
    """
    x = _prepare(x, steps)
    batch = x.shape[0]
    x_adv = threat.random_init(x, generator)
    best_x = x_adv.clone()
    best_values = torch.full((batch,), -math.inf, device=x.device)
    success = torch.zeros(batch, dtype=torch.bool, device=x.device)
    steps_run = torch.zeros(batch, dtype=torch.long, device=x.device)
    velocity = torch.zeros_like(x)
    active = torch.arange(batch, device=x.device)

    with attack_mode(objective.modules()), _progress(steps, progress, "PGD") as bar:
        for _ in range(steps):
            if active.numel() == 0:
                break
            current = objective if active.numel() == batch else objective.subset(active)
            values, hit, grad = _value_and_grad(current, x_adv[active])
            if keep_best:
                improved = values > best_values[active]
                best_values[active] = torch.where(improved, values, best_values[active])
                best_x[active[improved]] = x_adv[active[improved]]
            steps_run[active] += 1
            if hit is not None:
                success[active] |= hit
                if early_stop and bool(hit.any()):
                    # A broken sample keeps the iterate that broke it; it leaves the batch.
                    best_x[active[hit]] = x_adv[active[hit]]
                    best_values[active[hit]] = values[hit]
                    keep = ~hit
                    active, grad = active[keep], grad[keep]
                    if active.numel() == 0:
                        bar.update(1)
                        break
            direction = grad
            if momentum > 0:
                scale = grad.abs().flatten(1).mean(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
                velocity[active] = momentum * velocity[active] + grad / scale
                direction = velocity[active]
            x_adv[active] = threat.step(x_adv[active], direction, x[active])
            bar.update(1)

        values_out: torch.Tensor | None = None
        finished = success.clone() if early_stop else torch.zeros_like(success)
        if keep_best and active.numel() > 0:
            # Score the last iterate too: it may beat every iterate scored so far.
            current = objective if active.numel() == batch else objective.subset(active)
            last, hit, _ = _value_and_grad(current, x_adv[active], need_grad=False)
            improved = last > best_values[active]
            best_values[active] = torch.where(improved, last, best_values[active])
            best_x[active[improved]] = x_adv[active[improved]]
            if hit is not None:
                success[active] |= hit & improved
        if keep_best:
            x_out, values_out = best_x, best_values
        else:
            x_out = torch.where(finished.view(-1, 1, 1, 1), best_x, x_adv)
    return AttackResult(x_adv=x_out.detach(), values=values_out, success=success, steps_run=steps_run)


def apgd_checkpoints(steps: int) -> list[int]:
    """APGD's step-size checkpoints w_j = ⌈p_j · N⌉ with p_0 = 0, p_1 = 0.22,
    p_{j+1} = p_j + max(p_j − p_{j−1} − 0.03, 0.06) (Croce & Hein, 2020)."""
    fractions = [0.0, 0.22]
    while fractions[-1] < 1.0:
        fractions.append(fractions[-1] + max(fractions[-1] - fractions[-2] - 0.03, 0.06))
    # Rounding first keeps float noise (0.57 * 100 = 57.000000000000007) from bumping a checkpoint.
    points = {math.ceil(round(p * steps, 9)) for p in fractions[1:]}
    return sorted(p for p in points if 0 < p < steps)


def apgd(
    objective: Objective,
    x: torch.Tensor,
    threat: ThreatModel,
    steps: int,
    *,
    init: torch.Tensor | None = None,
    rho: float = 0.75,
    momentum: float = 0.75,
    early_stop: bool = True,
    groups: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> AttackResult:
    """Auto-PGD (Croce & Hein, 2020): momentum 0.75, step size 2ε halved at checkpoints when progress
    stalls (fewer than ρ of the steps since the last checkpoint improved, or neither step size nor best
    value changed), restarting from the best iterate; returns the best iterate.

    ``init`` warm-starts from a given perturbation (e.g. the best of a previous, cheaper pass);
    it is projected into the ball first. ``groups`` (one id per row) ties rows together under early stop:
    when a row succeeds, every row with its id stops too (several attacks on one image side by side,
    where one success breaks the image); those rows keep their best iterate and report no success.
    """
    x = _prepare(x, steps)
    batch = x.shape[0]
    device = x.device
    if groups is not None:
        if groups.shape != (batch,):
            raise ValueError(f"groups must hold one id per image, shape ({batch},), got {tuple(groups.shape)}")
        groups = groups.to(device)
    x_cur = threat.project(init.detach().float(), x) if init is not None else threat.random_init(x, generator)
    x_prev = x_cur.clone()
    step_size = torch.full((batch,), 2.0 * threat.eps, device=device)
    best_x = x_cur.clone()
    best_values = torch.full((batch,), -math.inf, device=device)
    best_grad = torch.zeros_like(x)
    last_values = torch.full((batch,), -math.inf, device=device)
    success = torch.zeros(batch, dtype=torch.bool, device=device)
    steps_run = torch.zeros(batch, dtype=torch.long, device=device)
    improvements = torch.zeros(batch, dtype=torch.long, device=device)
    checkpoint_step_size = step_size.clone()
    checkpoint_best = best_values.clone()
    checkpoints = set(apgd_checkpoints(steps))
    previous_checkpoint = 0
    active = torch.arange(batch, device=device)

    with attack_mode(objective.modules()), _progress(steps, progress, "APGD") as bar:
        for iteration in range(steps + 1):
            if active.numel() == 0:
                break
            current = objective if active.numel() == batch else objective.subset(active)
            # The last evaluation only scores the final iterate: no gradient needed.
            values, hit, grad = _value_and_grad(current, x_cur[active], need_grad=iteration < steps)
            if iteration > 0:
                improvements[active] += (values > last_values[active]).long()
            last_values[active] = values
            improved = values > best_values[active]
            best_values[active] = torch.where(improved, values, best_values[active])
            best_x[active[improved]] = x_cur[active[improved]]
            if grad is not None:
                best_grad[active[improved]] = grad[improved]
            if hit is not None:
                success[active] |= hit
                if early_stop and bool(hit.any()):
                    best_x[active[hit]] = x_cur[active[hit]]
                    best_values[active[hit]] = values[hit]
                    done = hit if groups is None else torch.isin(groups[active], groups[active[hit]])
                    keep = ~done
                    active = active[keep]
                    grad = grad[keep] if grad is not None else None
            if iteration == steps or active.numel() == 0:
                break

            if iteration in checkpoints:
                span = iteration - previous_checkpoint
                too_few = improvements[active] < rho * span
                stalled = (checkpoint_step_size[active] == step_size[active]) & (checkpoint_best[active] == best_values[active])
                reduce = too_few | stalled
                checkpoint_step_size[active] = step_size[active]
                checkpoint_best[active] = best_values[active]
                improvements[active] = 0
                previous_checkpoint = iteration
                if bool(reduce.any()):
                    restart = active[reduce]
                    step_size[restart] /= 2
                    # Restart from the best point, with its gradient and without momentum.
                    x_cur[restart] = best_x[restart]
                    x_prev[restart] = best_x[restart]
                    grad = grad.clone()
                    grad[reduce] = best_grad[restart]

            # While every sample is active, a slice indexes by view instead of gathering copies.
            a = slice(None) if active.numel() == batch else active
            z = threat.step(x_cur[a], grad, x[a], step_size[a])
            if iteration == 0:
                x_next = z
            else:
                x_next = threat.project(x_cur[a] + momentum * (z - x_cur[a]) + (1 - momentum) * (x_cur[a] - x_prev[a]), x[a])
            x_prev[a] = x_cur[a]
            x_cur[a] = x_next
            steps_run[a] += 1
            bar.update(1)
    return AttackResult(x_adv=best_x.detach(), values=best_values, success=success, steps_run=steps_run)
