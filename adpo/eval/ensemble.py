"""The attack ensemble: every pass of a task on the samples still unbroken, in batches and precision stages, with
per-sample early stopping, keeping each sample's worst output (see :mod:`adpo.eval.protocol` for the order)."""

from __future__ import annotations

import contextlib
import itertools
import math
import time
from dataclasses import dataclass
from typing import Sequence

import torch
from tqdm.auto import tqdm

from adpo.attacks import apgd
from adpo.eval.adapters import index_batches
from adpo.eval.tasks import Outcome, Sample, Task
from adpo.threat import ThreatModel


def precision_context(precision: str, device: torch.device):
    """Autocast for an attack stage. "half" is fp16 autocast on GPUs and fp32 on CPUs: CPU autocast has no fp16,
    and bf16 autocast made the batched attack 1.9x slower than fp32 on a 2-core AVX512-bf16 CPU, defeating the
    cheap first stage's purpose ("bfloat16" asks for it explicitly)."""
    if precision == "float32" or (precision == "half" and device.type == "cpu"):
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bfloat16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


@dataclass
class AttackRun:
    """Per-sample results of the attack at one epsilon."""

    worst: list[Outcome | None]  # worst attack output per sample (None: never attacked)
    steps: list[int]  # per sample, the gradient steps its attack took (every pass and stage)
    attacked: int
    seconds: float

    @property
    def gradient_steps(self) -> int:
        return sum(self.steps)


def attack_ensemble(
    model,
    task: Task,
    samples: Sequence[Sample],
    pixels: torch.Tensor,
    clean: Sequence[Outcome],
    threat: ThreatModel,
    steps: int,
    precision_schedule: Sequence[str],
    batch_size: int,
    generator: torch.Generator | None = None,
    progress: bool = False,
    carried: Sequence[Outcome | None] | None = None,
) -> AttackRun:
    """Run every attack pass of ``task`` in every precision stage on the samples that are not yet broken.

    ``carried``: per sample, the worst attack output found at a smaller epsilon of the same norm. Its image
    lies in this ball too, so it starts as the sample's worst here, and a sample it breaks is not attacked again.

    Passes whose success does not imply a broken sample (captions; one of several VQA answers) run one after
    another, each decoded and scored before the next. The others (early-stopping passes) run side by side:
    one row per (sample, pass), a sample's rows in one batch where ``batch_size`` rows allow, and a sample's
    rows stop together once one of them breaks it. Each unbroken sample still gets every pass's full steps;
    the batch just no longer waits for one pass to finish before the next starts.
    """
    start = time.perf_counter()
    passes = [{p.key: p for p in task.passes(s, c.output)} for s, c in zip(samples, clean)]
    keys = list(dict.fromkeys(key for per_sample in passes for key in per_sample))
    one_by_one = [k for k in keys if any(k in p and not p[k].early_stop for p in passes)]
    side_by_side = any(p.early_stop for per_sample in passes for p in per_sample.values())
    worst: list[Outcome | None] = list(carried) if carried is not None else [None] * len(samples)
    if len(worst) != len(samples):
        raise ValueError(f"carried has {len(worst)} outcomes for {len(samples)} samples")
    broken = [task.broken(c.scores) or (w is not None and task.broken(w.scores)) for c, w in zip(clean, worst)]
    attacked = [False] * len(samples)
    sample_steps = [0] * len(samples)
    device = model.device
    label = eps_label(threat.eps)
    bar = tqdm(total=len(precision_schedule) * (len(one_by_one) + side_by_side), desc=f"attack ε={label}",
               disable=None if progress else True, leave=False)  # None: quiet when not a TTY

    def run(rows: list[tuple[int, str]], stage: int, precision: str, early_stop: bool) -> None:
        rows = [(i, key) for i, key in rows if not broken[i]]  # an earlier chunk may have broken the sample
        if not rows:
            return
        index = [i for i, _ in rows]
        x = pixels[index].to(device)
        init = None
        if stage > 0:
            # Warm start from the worst perturbation so far (a fresh random start where there is none).
            init = threat.random_init(x, generator)
            for row, i in enumerate(index):
                if worst[i] is not None:
                    init[row] = worst[i].x_adv.to(device)
        objective = model.objective([samples[i] for i in index], [passes[i][key] for i, key in rows])
        groups = torch.tensor(index) if early_stop else None
        with precision_context(precision, device):
            result = apgd(objective, x, threat, steps, init=init, early_stop=early_stop, groups=groups, generator=generator)
        for row, i in enumerate(index):
            attacked[i] = True
            sample_steps[i] += int(result.steps_run[row])
        # A row stopped because another pass broke its sample need not be decoded.
        decode = [r for r in range(len(rows)) if not early_stop or bool(result.success[r]) or int(result.steps_run[r]) >= steps]
        decoded_samples = [samples[index[r]] for r in decode]
        outputs = model.predict(result.x_adv[decode], decoded_samples) if decode else []
        for r, output, scores in zip(decode, outputs, task.score(decoded_samples, outputs)):
            i, key = rows[r]
            if worst[i] is None or scores[task.primary] < worst[i].scores[task.primary]:
                worst[i] = Outcome(output, scores, result.x_adv[r].detach().cpu(), f"{key}@{precision} ε={label}")
            broken[i] = task.broken(worst[i].scores)

    for stage, precision in enumerate(precision_schedule):
        for key in one_by_one:
            todo = [(i, key) for i in range(len(samples)) if key in passes[i] and not passes[i][key].early_stop and not broken[i]]
            for chunk in index_batches(todo, batch_size):
                run(chunk, stage, precision, early_stop=False)
            bar.update(1)
        if side_by_side:
            todo = [(i, key) for i in range(len(samples)) if not broken[i] for key in keys if key in passes[i] and passes[i][key].early_stop]
            for chunk in _pack_by_sample(todo, batch_size):
                run(chunk, stage, precision, early_stop=True)
            bar.update(1)
    bar.close()
    return AttackRun(worst, sample_steps, sum(attacked), time.perf_counter() - start)


def _pack_by_sample(rows: Sequence[tuple[int, str]], size: int) -> list[list[tuple[int, str]]]:
    """Chunks of at most ``size`` (sample, pass) rows, keeping a sample's rows together where they fit; a sample
    with more rows than ``size`` gets consecutive chunks of its own, which run in turn (batch size 1: one pass
    after another, the per-sample loop of the reference code)."""
    chunks: list[list[tuple[int, str]]] = []
    current: list[tuple[int, str]] = []
    for _, group in itertools.groupby(rows, key=lambda row: row[0]):
        mine = list(group)
        if current and len(current) + len(mine) > size:
            chunks.append(current)
            current = []
        while len(mine) > size:
            chunks.append(mine[:size])
            mine = mine[size:]
        current += mine
        if len(current) == size:
            chunks.append(current)
            current = []
    if current:
        chunks.append(current)
    return chunks


def robust_outcomes(task: Task, clean: Sequence[Outcome], run: AttackRun) -> list[Outcome]:
    """Per sample, the worst of the clean output and every attack output (the clean image is in the ball)."""
    final = []
    for clean_outcome, attack in zip(clean, run.worst):
        if attack is not None and attack.scores[task.primary] <= clean_outcome.scores[task.primary]:
            final.append(attack)
        else:
            final.append(clean_outcome)
    return final


def eps_label(eps: float) -> str:
    """How reports name an epsilon: in 255ths where it is a whole number of hundredths of them ("4/255"), else as is."""
    in_255ths = round(eps * 255, 2)
    return f"{in_255ths:g}/255" if math.isclose(eps * 255, in_255ths, abs_tol=1e-4) else f"{eps:.4g}"
