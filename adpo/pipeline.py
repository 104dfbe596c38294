"""``adpo run``: the whole AdPO story from one config.

pairs on the small LVLM → AdPO / FARE / TeCoA encoders → graft each into the large LVLM → evaluate the
original and every encoder on both LVLMs, clean and under attack → one comparison table and chart.

Every stage is an ordinary ``adpo`` subcommand run with a config file that this module writes into the
stage's own directory (``<output_dir>/<stage>/stage_config.yaml``: the stage's base config from
``configs/`` merged with the pipeline's overrides), so any stage can be re-run by hand exactly as the
pipeline ran it. A stage that finished leaves ``STAGE_DONE.json``; a rerun skips it (``--force`` redoes
everything, ``--force-stage NAME`` one stage). A stage killed half-way is simply run again: the stages
themselves resume (pair shards, trainer checkpoints) or rewrite their outputs atomically.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from adpo.io import atomic_directory, write_json_atomic, write_yaml_atomic

DONE_MARKER = "STAGE_DONE.json"
ORIGINAL = "original"
METHODS = ("fare", "tecoa", "simclip", "adpo")


@dataclass
class StageSpec:
    """A stage's base config file (relative to the repo or absolute) and the keys the pipeline overrides."""

    config: str | None = None
    overrides: dict[str, Any] = field(default_factory=dict)


@dataclass
class PipelineConfig:
    output_dir: str = "outputs/quickstart"
    small_model: str = "world:small"
    large_model: str = "world:large"
    methods: list[str] = field(default_factory=lambda: ["fare", "tecoa", "adpo"])
    seed: int = 0
    eps: str | None = None  # None: each stage's default (the world's working ε for world models)
    pairs: StageSpec = field(default_factory=StageSpec)
    train: dict[str, StageSpec] = field(default_factory=dict)
    transfer: StageSpec = field(default_factory=StageSpec)
    eval: StageSpec = field(default_factory=StageSpec)
    eval_large: bool = True

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> "PipelineConfig":
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"pipeline config {path} does not exist; try configs/quickstart.yaml")
        raw = yaml.safe_load(path.read_text()) or {}
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ValueError(f"{path}: unknown keys {unknown}; valid keys are {sorted(known)}")

        def spec(value: Any, where: str) -> StageSpec:
            if value is None:
                return StageSpec()
            if not isinstance(value, dict) or set(value) - {"config", "overrides"}:
                raise ValueError(f"{path}: '{where}' must be a mapping with 'config' and/or 'overrides'")
            return StageSpec(config=value.get("config"), overrides=dict(value.get("overrides") or {}))

        config = cls(**{k: v for k, v in raw.items() if k not in ("pairs", "train", "transfer", "eval")})
        config.pairs = spec(raw.get("pairs"), "pairs")
        config.transfer = spec(raw.get("transfer"), "transfer")
        config.eval = spec(raw.get("eval"), "eval")
        config.train = {name: spec(value, f"train.{name}") for name, value in (raw.get("train") or {}).items()}
        bad = [m for m in config.methods if m not in METHODS]
        if bad:
            raise ValueError(f"{path}: unknown methods {bad}; choose from {list(METHODS)}")
        missing = [m for m in config.methods if m not in config.train]
        if missing:
            raise ValueError(f"{path}: methods {missing} have no 'train.<method>' entry naming their base config")
        return config


@dataclass
class Stage:
    name: str
    directory: Path
    run: Callable[[], None]


def _repo_root() -> Path:
    return Path(__file__).resolve().parent.parent


def _load_base(spec: StageSpec) -> dict[str, Any]:
    if spec.config is None:
        return {}
    path = Path(spec.config)
    if not path.is_absolute() and not path.exists():
        path = _repo_root() / spec.config
    if not path.exists():
        raise FileNotFoundError(f"stage config {spec.config} not found (looked in the working directory and {_repo_root()})")
    return yaml.safe_load(path.read_text()) or {}


def _stage_config(directory: Path, spec: StageSpec, pipeline_keys: dict[str, Any]) -> Path:
    # Precedence: base config < pipeline-derived keys (paths, models, seed) < the user's explicit overrides.
    merged = {**_load_base(spec), **pipeline_keys, **spec.overrides}
    return write_yaml_atomic(directory / "stage_config.yaml", merged)


def _adpo(argv: list[str]) -> None:
    from adpo.cli import main as adpo_main

    code = adpo_main(argv)
    if code:
        raise RuntimeError(f"`adpo {' '.join(argv)}` failed with exit code {code}")


def encoder_dir(train_dir: Path) -> Path:
    """Where a trainer wrote its encoder (``<dir>/encoder`` or the directory itself)."""
    nested = train_dir / "encoder"
    return nested if (nested / "config.json").exists() else train_dir


def _eval_name(method: str, size: str) -> str:
    """The report's row label, e.g. ``adpo (small)``."""
    return f"{method} ({size})"


def build_stages(config: PipelineConfig) -> list[Stage]:
    out = Path(config.output_dir)
    eps_keys = {} if config.eps is None else {"eps": config.eps}
    stages: list[Stage] = []

    pairs_dir = out / "pairs"
    if "adpo" in config.methods:
        def run_pairs() -> None:
            path = _stage_config(pairs_dir, config.pairs, {"model_name_or_path": config.small_model, "output_dir": str(pairs_dir / "run"), "seed": config.seed, **eps_keys})
            _adpo(["pairs", "--config", str(path)])

        stages.append(Stage("pairs", pairs_dir, run_pairs))

    for method in config.methods:
        train_dir = out / "train" / method
        keys: dict[str, Any] = {"output_dir": str(train_dir / "run"), "seed": config.seed}
        if method == "adpo":
            # AdPO trains the tower inside the small LVLM; the baselines train the same encoder wherever their
            # base config says (the world's standalone WorldCLIP, whose vision tower the LVLMs share).
            keys.update(model_name_or_path=config.small_model, dataset_path=str(pairs_dir / "run" / "dataset"))
            if config.eps is not None:
                keys["attack_eps"] = config.eps
        else:
            keys.update(eps_keys)

        def run_train(method: str = method, train_dir: Path = train_dir, keys: dict = keys) -> None:
            path = _stage_config(train_dir, config.train[method], keys)
            _adpo(["train", method, "--config", str(path)])

        stages.append(Stage(f"train-{method}", train_dir, run_train))

    def trained_encoder(method: str) -> Path:
        return encoder_dir(out / "train" / method / "run")

    if config.eval_large:
        for method in config.methods:
            transfer_dir = out / "transfer" / method

            def run_transfer(method: str = method, transfer_dir: Path = transfer_dir) -> None:
                path = _stage_config(transfer_dir, config.transfer, {"encoder": str(trained_encoder(method)), "target": config.large_model, "out": str(transfer_dir / "model"), "overwrite": True})
                _adpo(["transfer", "--config", str(path)])

            stages.append(Stage(f"transfer-{method}", transfer_dir, run_transfer))

    sizes = [("small", config.small_model)] + ([("large", config.large_model)] if config.eval_large else [])
    report_dirs: list[Path] = []
    report_names: list[str] = []
    for size, base_model in sizes:
        for method in [ORIGINAL, *config.methods]:
            eval_dir = out / "eval" / f"{size}-{method}"
            report_dirs.append(eval_dir / "report")
            report_names.append(_eval_name(method, size))

            def run_eval(size: str = size, base_model: str = base_model, method: str = method, eval_dir: Path = eval_dir) -> None:
                keys: dict[str, Any] = {"output_dir": str(eval_dir / "report"), "seed": config.seed, "name": _eval_name(method, size)}
                if method == ORIGINAL:
                    keys.update(model=base_model, encoder=None)
                elif size == "small":
                    keys.update(model=base_model, encoder=str(trained_encoder(method)))
                else:  # the large LVLM after transfer: the grafted model directory
                    keys.update(model=str(out / "transfer" / method / "model"), encoder=None)
                if config.eps is not None:
                    keys["eps"] = [config.eps]
                path = _stage_config(eval_dir, config.eval, keys)
                _adpo(["eval", "--config", str(path)])

            stages.append(Stage(f"eval-{size}-{method}", eval_dir, run_eval))

    report_dir = out / "report"

    def run_report() -> None:
        with atomic_directory(report_dir) as staging:
            # each encoder against the undefended model on the same LVLM, question by question
            baselines = [arg for size, _ in sizes for arg in ("--baseline", _eval_name(ORIGINAL, size))]
            _adpo(["eval", "compare", *map(str, report_dirs), "--names", *report_names, *baselines, "--out", str(staging)])
            shifts = feature_shifts(out / "transfer", config.methods) if config.eval_large else None
            if shifts:
                write_json_atomic(staging / "feature_shift.json", shifts)
                with open(staging / "compare.md", "a", encoding="utf-8") as markdown:
                    markdown.write("\n" + feature_shift_section(shifts))

    stages.append(Stage("report", report_dir, run_report))
    return stages


def feature_shifts(transfer_dir: Path, methods: list[str]) -> dict | None:
    """The transfer stage's feature shift on the large LVLM's projector, for the original tower and each encoder
    (None when the transfers measured none): whether an encoder holds still the features the large LVLM reads."""
    measured = {}
    for method in methods:
        path = transfer_dir / method / "model" / "graft_report.json"
        verification = json.loads(path.read_text()).get("verification", {}) if path.exists() else {}
        if "grafted_feature_shift_mean" in verification:
            measured[method] = verification
    if not measured:
        return None
    first = next(iter(measured.values()))
    rows = {ORIGINAL: {"mean": first["original_feature_shift_mean"], "max": first["original_feature_shift_max"]}}
    rows |= {m: {"mean": v["grafted_feature_shift_mean"], "max": v["grafted_feature_shift_max"]} for m, v in measured.items()}
    return {"threat": first["grafted_feature_shift_threat"], "num_images": first["num_samples"], "shift": rows}


def feature_shift_section(shifts: dict) -> str:
    """:func:`feature_shifts` as a markdown section for the report."""
    lines = [
        "## Feature shift on the large LVLM's projector (transfer stage)",
        "",
        f"How far an attack on the features moves what the large LVLM's language model reads, relative to its clean "
        f"value, on the transfer stage's {shifts['num_images']} verification images ({shifts['threat']}). "
        "The large LVLM inherits robustness from an encoder only where this falls below the original's.",
        "",
        "| Encoder | mean | max |",
        "|---|---|---|",
    ]
    lines += [f"| {name} | {row['mean']:.3f} | {row['max']:.3f} |" for name, row in shifts["shift"].items()]
    return "\n".join(lines) + "\n"


def run_pipeline(config: PipelineConfig, force: bool = False, force_stages: tuple[str, ...] = (), only: tuple[str, ...] = ()) -> Path:
    stages = build_stages(config)
    names = [stage.name for stage in stages]
    for name in (*force_stages, *only):
        if name not in names:
            raise ValueError(f"unknown stage {name!r}; stages are {names}")
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    started = time.perf_counter()
    for index, stage in enumerate(stages, 1):
        if only and stage.name not in only:
            continue
        marker = stage.directory / DONE_MARKER
        prefix = f"[adpo run {index}/{len(stages)}] {stage.name}"
        if marker.exists() and not force and stage.name not in force_stages:
            print(f"{prefix}: done earlier, skipped ({marker})", flush=True)
            continue
        if force or stage.name in force_stages:
            # Redo means from scratch: a stage resumes whatever it finds (pair shards, checkpoints), and
            # those may come from other settings or since-rebuilt models.
            shutil.rmtree(stage.directory, ignore_errors=True)
        print(f"{prefix}: running", flush=True)
        marker.unlink(missing_ok=True)
        stage_start = time.perf_counter()
        stage.run()
        timings[stage.name] = round(time.perf_counter() - stage_start, 1)
        stage.directory.mkdir(parents=True, exist_ok=True)
        write_json_atomic(marker, {"stage": stage.name, "seconds": timings[stage.name], "finished": time.strftime("%Y-%m-%dT%H:%M:%S")})
        print(f"{prefix}: finished in {timings[stage.name]:.0f} s", flush=True)
    total = round(time.perf_counter() - started, 1)
    write_json_atomic(out / "pipeline.json", {"stages": names, "seconds_this_run": timings, "total_seconds_this_run": total})
    print(f"[adpo run] all stages done in {total:.0f} s; report: {out / 'report'}", flush=True)
    return out / "report"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="adpo run",
        description="Run the whole pipeline (pairs -> AdPO/FARE/TeCoA -> transfer -> eval -> report) from one YAML "
        "config. Finished stages are skipped on a rerun; each stage's config is written beside its outputs.",
    )
    parser.add_argument("--config", required=True, help="pipeline YAML, e.g. configs/quickstart.yaml")
    parser.add_argument("--output-dir", help="override the config's output_dir")
    parser.add_argument("--force", action="store_true", help="redo every stage, even finished ones")
    parser.add_argument("--force-stage", action="append", default=[], metavar="NAME", help="redo this stage (repeatable)")
    parser.add_argument("--only", action="append", default=[], metavar="NAME", help="run only this stage (repeatable)")
    parser.add_argument("--list", action="store_true", help="list the stages and whether they are done, then exit")
    args = parser.parse_args(argv)
    config = PipelineConfig.from_yaml(args.config)
    if args.output_dir:
        config.output_dir = args.output_dir
    if args.list:
        for stage in build_stages(config):
            state = "done" if (stage.directory / DONE_MARKER).exists() else "to do"
            print(f"{stage.name:24s} {state:6s} {stage.directory}")
        return 0
    run_pipeline(config, force=args.force, force_stages=tuple(args.force_stage), only=tuple(args.only))
    return 0


if __name__ == "__main__":
    from adpo.runtime import run_as_process

    sys.exit(run_as_process(main))
