"""``adpo run``: the whole AdPO story from one config.

pairs on the small LVLM → AdPO / FARE / TeCoA encoders → graft each into the large LVLM → evaluate the
original and every encoder on both LVLMs, clean and under attack → one comparison table and chart.

Every stage is an ordinary ``adpo`` subcommand run with a config file that this module writes into the
stage's own directory (``<output_dir>/<stage>/stage_config.yaml``: the stage's base config from
``configs/`` merged with the pipeline's overrides), so any stage can be re-run by hand exactly as the
pipeline ran it. A stage that finished leaves ``STAGE_DONE.json``, which records its settings (that merged
config), a key of the weights behind each model it names, and which run of each input stage it read; a rerun
skips it while all still hold, and redoes it from scratch when one changed: an edited config, new weights under
a model's name, or an input stage redone since. ``--force`` redoes everything,
``--force-stage NAME`` one stage. A stage killed half-way is simply run again: the stages themselves resume
(pair shards, trainer checkpoints) or rewrite their outputs atomically, unless its settings changed meanwhile.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import json
import multiprocessing
import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from adpo.errors import UsageError, renamed_keys
from adpo.io import atomic_directory, write_json_atomic, write_yaml_atomic
from adpo.runtime import STAGE_OUTPUTS, declared_outputs_of
from adpo.threat import DEPRECATED_THREAT_KEYS

DONE_MARKER = "STAGE_DONE.json"
RUNNING_MARKER = "STAGE_RUNNING.json"  # written when a stage starts, removed when it finishes
ORIGINAL = "original"
# stage-config keys that name a model or encoder to load: a stage is redone when the weights behind one change
MODEL_KEYS = ("model_name_or_path", "text_model_name_or_path", "model", "clip_model", "target", "encoder")
METHODS = ("fare", "tecoa", "simclip", "adpo", "mmcoa", "deltaclip", "instruct", "classifier")
# Trainers whose run is a whole LVLM, scored as it is on the size it tuned (no graft), and trainers whose run only
# feeds other stages (a robust backbone for instruct's vision_backbone); the others train an encoder.
LVLM_TRAINERS, FEEDING_TRAINERS = ("instruct",), ("classifier",)
# train.<name>.inputs: a stage-config key -> the output (adpo_outputs.json) of another method's run that fills it
INPUT_OUTPUTS = {"encoder": "encoder", "vision_backbone": "classifier"}
# Each trainer's key for "train on the first N images" (AdPO with stored pairs: the pairs stage's images).
TRAIN_IMAGES_KEYS = {"fare": "max_train_samples", "tecoa": "max_train_samples", "simclip": "max_train_samples",
                     "adpo": "max_images", "mmcoa": "max_train_samples", "deltaclip": "max_train_samples",
                     "instruct": "max_train_samples"}


@dataclass
class StageSpec:
    """A stage's base config file (relative to the repo or absolute) and the keys the pipeline overrides.
    ``trainer`` (train entries only) lets a method name a variant of a trainer, e.g. ``adpo_anchor`` training
    with ``adpo`` under other overrides; by default a method's name is its trainer's."""

    config: str | None = None
    overrides: dict[str, Any] = field(default_factory=dict)
    trainer: str | None = None
    size: str = "small"  # instruct: the LVLM it tunes and is scored on
    inputs: dict[str, str] = field(default_factory=dict)  # e.g. {encoder: fare}: that method's output goes in


@dataclass
class PipelineConfig:
    output_dir: str = "outputs/quickstart"
    small_model: str = ""  # required: the LVLM the encoders are trained on (AdPO) and first scored on
    large_model: str = ""  # required: the LVLM they are grafted into
    methods: list[str] = field(default_factory=lambda: ["fare", "tecoa", "adpo"])
    seed: int = 0
    eps: str | None = None  # None: each stage's default (the world's working ε for world models)
    train_eps: str | None = None  # the trainers' attack ε when it differs from the evaluation's (default: eps)
    train_images: int | None = None  # every method trains on the first N training images (one data budget)
    versus: list[list[str]] = field(default_factory=list)  # head-to-head pairs of methods, e.g. [[adpo, fare]]
    pairs: StageSpec = field(default_factory=StageSpec)
    train: dict[str, StageSpec] = field(default_factory=dict)
    transfer: StageSpec = field(default_factory=StageSpec)
    eval: StageSpec = field(default_factory=StageSpec)
    eval_targeted: StageSpec | None = None  # a second evaluation of every model (e.g. task: targeted), own report
    eval_large: bool = True
    eval_zeroshot: StageSpec | None = None  # zero-shot under image/text/joint attacks (adpo/pipeline_zeroshot.py)

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> "PipelineConfig":
        path = Path(path)
        if not path.exists():
            raise UsageError(f"pipeline config {path} does not exist; try configs/quickstart.yaml")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as error:
            raise UsageError(f"pipeline config {path} is not valid YAML: {error}") from error
        if not isinstance(raw, dict):
            raise UsageError(f"pipeline config {path} must be a mapping of keys (output_dir, methods, train, ...)")
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(raw) - known)
        if unknown:
            raise UsageError(f"{path}: unknown keys {unknown}; valid keys are {sorted(known)}")

        def spec(value: Any, where: str) -> StageSpec:
            if value is None:
                return StageSpec()
            train = where.startswith("train.")
            allowed = {"config", "overrides", "trainer", "size", "inputs"} if train else {"config", "overrides"}
            if not isinstance(value, dict) or set(value) - allowed:
                raise UsageError(f"{path}: '{where}' must be a mapping with keys among {sorted(allowed)}")
            inputs = value.get("inputs") or {}
            if value.get("size", "small") not in ("small", "large") or not isinstance(inputs, dict) \
                    or set(inputs) - set(INPUT_OUTPUTS):
                raise UsageError(f"{path}: '{where}': size is small or large, inputs maps {sorted(INPUT_OUTPUTS)} to "
                                 "methods of the run")
            return StageSpec(config=value.get("config"), overrides=dict(value.get("overrides") or {}),
                             trainer=value.get("trainer"), size=value.get("size", "small"), inputs=dict(inputs))

        sections = ("pairs", "train", "transfer", "eval", "eval_targeted", "eval_zeroshot")
        config = cls(**{k: v for k, v in raw.items() if k not in sections})
        config.eval_zeroshot = spec(raw["eval_zeroshot"], "eval_zeroshot") if raw.get("eval_zeroshot") else None
        config.pairs = spec(raw.get("pairs"), "pairs")
        config.transfer = spec(raw.get("transfer"), "transfer")
        config.eval = spec(raw.get("eval"), "eval")
        config.eval_targeted = spec(raw["eval_targeted"], "eval_targeted") if raw.get("eval_targeted") else None
        config.train = {name: spec(value, f"train.{name}") for name, value in (raw.get("train") or {}).items()}
        missing = [m for m in config.methods if m not in config.train]
        if missing:
            raise UsageError(f"{path}: methods {missing} have no 'train.<method>' entry naming their base config")
        bad = [m for m in config.methods if config.trainer_of(m) not in METHODS]
        bad += [m for pair in config.versus for m in pair if m not in config.methods]
        bad += [m for name in config.methods for m in config.train[name].inputs.values() if m not in config.methods]
        if bad:
            raise UsageError(f"{path}: unknown methods {bad}; choose from {list(METHODS)}, or name a variant's trainer "
                             "(train.<name>.trainer); versus names methods of the run")
        unsafe = [m for m in config.methods if not re.fullmatch(r"[a-z0-9][a-z0-9_-]*", m) or m == ORIGINAL]
        if unsafe:
            raise UsageError(f"{path}: method names {unsafe} must be lower-case letters, digits, '_' or '-' (and not "
                             f"'{ORIGINAL}'): they name directories")
        if any(len(pair) != 2 for pair in config.versus):
            raise UsageError(f"{path}: versus holds pairs of methods, e.g. [[adpo, fare]]; got {config.versus}")
        unset = [key for key in ("small_model", "large_model") if not getattr(config, key)]
        if unset:
            raise UsageError(f"{path}: set {' and '.join(unset)} (LVLM names or directories; the bundled world's small and "
                             "large LVLMs in configs/quickstart.yaml)")
        return config

    def trainer_of(self, method: str) -> str:
        """The trainer a method runs: its train entry's ``trainer``, else its own name."""
        spec = self.train.get(method)
        return spec.trainer if spec is not None and spec.trainer else method


# Top-level keys `adpo run --set` may override (the stage sections are edited in the YAML).
SETTABLE_KEYS = {"output_dir", "small_model", "large_model", "seed", "eps", "train_eps", "train_images", "eval_large"}


@dataclass
class Stage:
    """One step of the pipeline. ``settings`` is everything its outputs depend on besides the outputs of its
    ``inputs`` (the names of the stages it reads); ``run`` does the work."""

    name: str
    directory: Path
    settings: dict[str, Any]
    run: Callable[[], None]
    inputs: tuple[str, ...] = ()
    declares: Path | None = None  # where the stage declares the outputs later stages read (adpo_outputs.json)


def _repo_root() -> Path:
    return Path(__file__).resolve().parent.parent


def _load_base(spec: StageSpec) -> dict[str, Any]:
    if spec.config is None:
        return {}
    path = Path(spec.config)
    if not path.is_absolute() and not path.exists():
        path = _repo_root() / spec.config
    if not path.exists():
        raise UsageError(f"stage config {spec.config} not found (looked in the working directory and {_repo_root()})")
    return yaml.safe_load(path.read_text()) or {}


def _merged_config(spec: StageSpec, pipeline_keys: dict[str, Any]) -> dict[str, Any]:
    # Precedence: base config < pipeline-derived keys (paths, models, seed) < the user's explicit overrides. A key under
    # its deprecated spelling (eps for attack_eps) is read as the new one, so that the precedence holds for it too.
    return {**renamed_keys(_load_base(spec), DEPRECATED_THREAT_KEYS, str(spec.config)), **pipeline_keys,
            **renamed_keys(spec.overrides, DEPRECATED_THREAT_KEYS, "overrides")}


def _command_stage(name: str, directory: Path, command: list[str], settings: dict[str, Any], inputs: tuple[str, ...] = (),
                   resolve: Callable[[dict[str, Any]], dict[str, Any]] | None = None, declares_outputs: bool = False) -> Stage:
    """A stage that runs ``adpo COMMAND --config <directory>/stage_config.yaml``. ``resolve`` fills in, when the
    stage runs, what only its inputs' outputs tell (where a trainer put its encoder). ``declares_outputs``: later
    stages read its outputs from what its ``output_dir`` declares."""

    def run() -> None:
        config = resolve(dict(settings)) if resolve else settings
        path = write_yaml_atomic(directory / "stage_config.yaml", config)
        _adpo([*command, "--config", str(path)])

    return Stage(name, directory, settings, run, inputs, Path(settings["output_dir"]) if declares_outputs else None)


class StageFailed(RuntimeError):
    """A stage's process exited with an error (it printed its own message)."""

    def __init__(self, argv: list[str], code: int):
        super().__init__(f"`adpo {' '.join(argv)}` failed with exit code {code}")
        self.code = code


# What most stages import (torch, transformers' models, TRL's parser, datasets, the eval and its plots): imported once
# here, a stage forked from this process starts with them (a fresh interpreter spends about 13 s on them per stage).
_STAGE_PRELOAD = ("adpo.models", "adpo.eval.loading", "adpo.eval.protocol", "adpo.eval.cli", "adpo.eval.plots", "datasets", "trl")


def _adpo(argv: list[str]) -> None:
    """Run ``adpo ARGV`` as its own process, so that each stage's memory, process group and state end with it (and a
    stage may itself be launched on several devices). Where the platform forks, the process is forked from this one
    after the common imports; elsewhere it is a fresh ``python -m adpo.cli``."""
    if "fork" not in multiprocessing.get_all_start_methods():
        code = subprocess.run([sys.executable, "-m", "adpo.cli", *argv]).returncode
    else:
        for module in _STAGE_PRELOAD:
            importlib.import_module(module)
        gc.freeze()  # the stage's garbage collector then never walks (and so never copies) this process's objects
        stage = multiprocessing.get_context("fork").Process(target=_run_stage, args=(argv,))
        stage.start()
        stage.join()
        code = stage.exitcode
    if code:
        raise StageFailed(argv, code)


def _run_stage(argv: list[str]) -> None:
    from adpo.cli import main
    from adpo.runtime import run_as_process

    sys.stdout.flush()
    code = run_as_process(lambda: main(argv))
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _eval_name(method: str, size: str) -> str:
    """The report's row label, e.g. ``adpo (small)``."""
    return f"{method} ({size})"


def stored_pairs_methods(config: PipelineConfig) -> list[str]:
    """The AdPO methods that train on stored preference pairs (they need the pairs stage; online ones do not)."""
    return [m for m in config.methods if config.trainer_of(m) == "adpo"
            and {**_load_base(config.train[m]), **config.train[m].overrides}.get("pair_source", "stored") != "online"]


def build_stages(config: PipelineConfig) -> list[Stage]:
    out = Path(config.output_dir)
    train_eps = config.train_eps if config.train_eps is not None else config.eps
    stages: list[Stage] = []

    pairs_dir = out / "pairs"
    if stored_pairs_methods(config):
        keys = {"model_name_or_path": config.small_model, "output_dir": str(pairs_dir / "run"), "seed": config.seed,
                **({} if train_eps is None else {"attack_eps": train_eps})}
        if config.train_images is not None:
            keys["max_images"] = config.train_images
        stages.append(_command_stage("pairs", pairs_dir, ["pairs"], _merged_config(config.pairs, keys), declares_outputs=True))

    for method in config.methods:
        trainer = config.trainer_of(method)
        if trainer in LVLM_TRAINERS and config.train[method].size == "large" and not config.eval_large:
            continue  # it would tune an LVLM this run does not score
        train_dir = out / "train" / method
        keys: dict[str, Any] = {"output_dir": str(train_dir / "run"), "seed": config.seed}
        inputs: tuple[str, ...] = ()
        # keys set, when the stage runs, to what their run declared (recorded as the path the run is expected to give)
        declared: dict[str, tuple[Path, str]] = {}
        if trainer == "adpo":
            # AdPO trains the tower inside the small LVLM; the baselines train the same encoder wherever their
            # base config says (the world's standalone WorldCLIP, whose vision tower the LVLMs share).
            keys["model_name_or_path"] = config.small_model
            if method not in stored_pairs_methods(config):
                if config.train_images is not None:
                    keys["max_images"] = config.train_images
            else:
                keys["dataset_path"] = str(pairs_dir / "run" / "dataset")  # recorded as earlier versions did
                declared["dataset_path"] = (pairs_dir / "run", "dataset")
                inputs = ("pairs",)
        elif config.train_images is not None and trainer in TRAIN_IMAGES_KEYS:
            keys[TRAIN_IMAGES_KEYS[trainer]] = config.train_images
        if train_eps is not None:
            keys["attack_eps"] = train_eps
        if trainer in LVLM_TRAINERS:
            keys["model_name_or_path"] = config.small_model if config.train[method].size == "small" else config.large_model
        for key, source in config.train[method].inputs.items():
            keys[key] = str(out / "train" / source / "run")
            declared[key] = (out / "train" / source / "run", INPUT_OUTPUTS[key])
            inputs += (f"train-{source}",)
        # resuming from the newest checkpoint (none: from the start) changes no result, so it is not recorded
        stages.append(_command_stage(f"train-{method}", train_dir, ["train", trainer], _merged_config(config.train[method], keys),
                                     inputs, declared_outputs_of(declared, resume_from_checkpoint="last"), declares_outputs=True))

    if config.eval_zeroshot is not None:  # right after training: they need no transfer
        from adpo.pipeline_zeroshot import zeroshot_stages

        stages += zeroshot_stages(config, out, Stage, _command_stage, _merged_config, _adpo, ORIGINAL)

    def with_trained_encoder(method: str) -> Callable[[dict[str, Any]], dict[str, Any]]:
        return declared_outputs_of({"encoder": (out / "train" / method / "run", "encoder")})

    encoder_methods = [m for m in config.methods if config.trainer_of(m) not in LVLM_TRAINERS + FEEDING_TRAINERS]
    if config.eval_large:
        for method in encoder_methods:
            transfer_dir = out / "transfer" / method
            keys = {"encoder": str(out / "train" / method / "run"), "target": config.large_model, "out": str(transfer_dir / "model"), "overwrite": True}
            stages.append(_command_stage(f"transfer-{method}", transfer_dir, ["transfer"], _merged_config(config.transfer, keys),
                                         (f"train-{method}",), with_trained_encoder(method)))

    sizes = [("small", config.small_model)] + ([("large", config.large_model)] if config.eval_large else [])

    def scored(method: str, size: str) -> bool:
        """Whether ``method`` has a model on the LVLM of ``size``: an encoder on both, a tuned LVLM on its own."""
        trainer = ORIGINAL if method == ORIGINAL else config.trainer_of(method)
        if trainer in FEEDING_TRAINERS:
            return False
        return trainer not in LVLM_TRAINERS or config.train[method].size == size

    def evaluation(kind: str, spec: StageSpec, report_name: str) -> None:
        report_dirs: list[Path] = []
        report_names: list[str] = []
        eval_stages: list[str] = []
        for size, base_model in sizes:
            for method in [m for m in [ORIGINAL, *config.methods] if scored(m, size)]:
                eval_dir = out / kind / f"{size}-{method}"
                report_dirs.append(eval_dir / "report")
                report_names.append(_eval_name(method, size))
                keys = {"output_dir": str(eval_dir / "report"), "seed": config.seed, "name": _eval_name(method, size)}
                inputs, resolve = (), None
                if method == ORIGINAL:
                    keys.update(model=base_model, encoder=None)
                elif config.trainer_of(method) in LVLM_TRAINERS:  # the merged model the run exported
                    keys.update(model=str(out / "train" / method / "run" / "model"), encoder=None)  # as recorded before
                    inputs, resolve = (f"train-{method}",), declared_outputs_of({"model": (out / "train" / method / "run", "model")})
                elif size == "small":
                    keys.update(model=base_model, encoder=str(out / "train" / method / "run"))
                    inputs, resolve = (f"train-{method}",), with_trained_encoder(method)
                else:  # the large LVLM after transfer: the grafted model directory
                    keys.update(model=str(out / "transfer" / method / "model"), encoder=None)
                    inputs = (f"transfer-{method}",)
                if config.eps is not None:
                    keys["attack_eps"] = [config.eps]
                name = f"{kind}-{size}-{method}"
                stages.append(_command_stage(name, eval_dir, ["eval"], _merged_config(spec, keys), inputs, resolve))
                eval_stages.append(name)

        report_dir = out / report_name
        # each model against the undefended one on the same LVLM, question by question
        baselines = [arg for size, _ in sizes for arg in ("--baseline", _eval_name(ORIGINAL, size))]
        versus = [arg for size, _ in sizes for first, second in config.versus if scored(first, size) and scored(second, size)
                  for arg in ("--versus", _eval_name(first, size), _eval_name(second, size))]
        compare = ["eval", "compare", *map(str, report_dirs), "--names", *report_names, *baselines, *versus]
        with_shift = kind == "eval" and config.eval_large

        def run_report() -> None:
            with atomic_directory(report_dir) as staging:
                _adpo([*compare, "--out", str(staging)])
                shifts = feature_shifts(out / "transfer", encoder_methods) if with_shift else None
                if shifts:
                    write_json_atomic(staging / "feature_shift.json", shifts)
                    with open(staging / "compare.md", "a", encoding="utf-8") as markdown:
                        markdown.write("\n" + feature_shift_section(shifts))

        transfers = tuple(f"transfer-{m}" for m in encoder_methods) if with_shift else ()
        stages.append(Stage(report_name, report_dir, {"compare": compare}, run_report, (*eval_stages, *transfers)))

    evaluation("eval", config.eval, "report")
    if config.eval_targeted is not None:
        evaluation("eval-targeted", config.eval_targeted, "report-targeted")
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


def _read_record(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.exists() else None


def _as_recorded(value: Any, output_dir: Path) -> Any:
    """``value`` as a JSON record holds it, with paths inside the output directory written relative to it: the
    same settings compare equal however the directory is spelled, or after it moved."""
    if isinstance(value, dict):
        return {str(key): _as_recorded(item, output_dir) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_as_recorded(item, output_dir) for item in value]
    if isinstance(value, str) and Path(value).is_relative_to(output_dir):
        return "{output_dir}/" + Path(value).relative_to(output_dir).as_posix()
    return json.loads(json.dumps(value, default=str))


def _record(stage: Stage, finished: dict[str, dict | None], output_dir: Path) -> dict[str, Any]:
    """What ``stage`` runs with now: its settings, the weights behind each model they name, and the run of each
    input stage it reads (models made inside the output directory are that stage's outputs)."""
    from adpo.models import model_identity

    named = [stage.settings.get(key) for key in MODEL_KEYS]
    models = sorted({name for name in named if isinstance(name, str) and not Path(name).is_relative_to(output_dir)})
    return {"settings": _as_recorded(stage.settings, output_dir), "models": {name: model_identity(name) for name in models},
            "inputs": {name: (finished.get(name) or {}).get("run_id") for name in stage.inputs}}


def _shown(settings: dict[str, Any], key: str) -> str:
    if key not in settings:
        return "unset"
    text = json.dumps(settings[key], default=str)
    return text if len(text) <= 40 else text[:37] + "..."


def why_outdated(record: dict[str, Any], wanted: dict[str, Any]) -> str | None:
    """Why the stage run that ``record`` describes does not give what ``wanted`` (see :func:`_record`) asks for;
    None when it does."""
    if not {"settings", "models", "inputs"} <= record.keys():
        return "it was run by an older adpo that did not record all it ran with"
    # a run recorded before the attack keys were renamed ran with the same settings under their old names
    old = {DEPRECATED_THREAT_KEYS.get(key, key): value for key, value in record["settings"].items()}
    new = wanted["settings"]
    changed = sorted(key for key in old.keys() | new.keys() if old.get(key, ...) != new.get(key, ...))
    if changed:
        shown = "; ".join(f"{key}: {_shown(old, key)} -> {_shown(new, key)}" for key in changed[:3])
        more = f"; and {len(changed) - 3} more" if len(changed) > 3 else ""
        return f"its settings changed ({shown}{more})"
    for name, identity in wanted["models"].items():
        if record["models"].get(name) != identity:
            return f"the weights behind {name} changed"
    for name, run_id in wanted["inputs"].items():
        if record["inputs"].get(name) != run_id:
            return f"its input stage {name} was redone since"
    return None


def _declares_outputs(directory: Path) -> bool:
    return (directory / STAGE_OUTPUTS).is_file()


def _decide(stage: Stage, wanted: dict[str, Any], done: dict[str, Any] | None, redone: set[str], forced: bool) -> tuple[str, str | None]:
    """``("skip" | "run" | "redo", why)`` for ``stage``, which is to run as ``wanted`` says and finished as ``done``
    says (None: it did not): a finished stage whose record still holds is skipped; a stage never finished runs
    and resumes what it left; a forced or outdated stage is redone from an empty directory."""
    if forced:
        return "redo", "forced"
    # not finished: killed half-way (resumed only if started with the same settings and inputs) or never started
    started = done or _read_record(stage.directory / RUNNING_MARKER)
    if started is None:
        return "run", None
    upstream = next((name for name in stage.inputs if name in redone), None)
    reason = f"its input stage {upstream} is redone" if upstream else why_outdated(started, wanted)
    if not reason and done and stage.declares is not None and not _declares_outputs(stage.declares):
        reason = f"it finished under an older adpo that did not declare its outputs ({stage.declares / STAGE_OUTPUTS})"
    if reason:
        return "redo", reason
    return ("skip", None) if done else ("run", None)


def run_pipeline(config: PipelineConfig, force: bool = False, force_stages: tuple[str, ...] = (), only: tuple[str, ...] = ()) -> Path:
    stages = build_stages(config)
    names = [stage.name for stage in stages]
    for name in (*force_stages, *only):
        if name not in names:
            raise UsageError(f"unknown stage {name!r}; stages are {names}")
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    finished = {stage.name: _read_record(stage.directory / DONE_MARKER) for stage in stages}
    timings: dict[str, float] = {}
    started = time.perf_counter()
    for index, stage in enumerate(stages, 1):
        if only and stage.name not in only:
            continue
        prefix = f"[adpo run {index}/{len(stages)}] {stage.name}"
        wanted = _record(stage, finished, out)
        action, reason = _decide(stage, wanted, finished[stage.name], set(timings), force or stage.name in force_stages)
        if action == "skip":
            print(f"{prefix}: done earlier, skipped ({stage.directory / DONE_MARKER})", flush=True)
            continue
        if action == "redo":
            # From scratch: a stage resumes whatever it finds (pair shards, checkpoints), and those were made
            # with other settings or inputs.
            shutil.rmtree(stage.directory, ignore_errors=True)
            print(f"{prefix}: redoing from scratch, {reason}", flush=True)
        else:
            print(f"{prefix}: running", flush=True)
        stage.directory.mkdir(parents=True, exist_ok=True)
        write_json_atomic(stage.directory / RUNNING_MARKER, wanted)
        stage_start = time.perf_counter()
        stage.run()
        timings[stage.name] = round(time.perf_counter() - stage_start, 1)
        finished[stage.name] = {"stage": stage.name, "seconds": timings[stage.name], "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
                                "run_id": uuid.uuid4().hex, **wanted}
        stage.directory.mkdir(parents=True, exist_ok=True)  # the report stage replaces its directory whole
        write_json_atomic(stage.directory / DONE_MARKER, finished[stage.name])
        (stage.directory / RUNNING_MARKER).unlink(missing_ok=True)
        print(f"{prefix}: finished in {timings[stage.name]:.0f} s", flush=True)
    total = round(time.perf_counter() - started, 1)
    write_json_atomic(out / "pipeline.json", {"stages": names, "seconds_this_run": timings, "total_seconds_this_run": total})
    print(f"[adpo run] all stages done in {total:.0f} s; report: {out / 'report'}", flush=True)
    return out / "report"


def stage_states(config: PipelineConfig) -> list[tuple[Stage, str]]:
    """Each stage and what a plain ``adpo run`` would do with it: ``done``, ``to do``, ``resumes`` (killed
    half-way) or ``redo: <why>``."""
    stages = build_stages(config)
    finished = {stage.name: _read_record(stage.directory / DONE_MARKER) for stage in stages}
    redone: set[str] = set()
    states = []
    for stage in stages:
        wanted = _record(stage, finished, Path(config.output_dir))
        action, reason = _decide(stage, wanted, finished[stage.name], redone, forced=False)
        if action == "skip":
            state = "done"
        elif action == "redo":
            state = f"redo: {reason}"
        else:
            state = "resumes" if (stage.directory / RUNNING_MARKER).exists() else "to do"
        if action != "skip":
            redone.add(stage.name)
        states.append((stage, state))
    return states


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="adpo run",
        description="Run the whole pipeline (pairs -> AdPO/FARE/TeCoA -> transfer -> eval -> report) from one YAML "
        "config. Finished stages are skipped on a rerun, unless their settings changed or a stage they read was "
        "redone; each stage's config is written beside its outputs.",
    )
    parser.add_argument("--config", required=True, help="pipeline YAML, e.g. configs/quickstart.yaml")
    parser.add_argument("--output-dir", help="override the config's output_dir")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="assignments",
                        help="override a top-level key of the pipeline YAML (the value is read as YAML), e.g. "
                        "--set train_eps=8/255 --set train_images=512 (repeatable)")
    parser.add_argument("--force", action="store_true", help="redo every stage, even finished ones")
    parser.add_argument("--force-stage", action="append", default=[], metavar="NAME", help="redo this stage, and the stages that read it (repeatable)")
    parser.add_argument("--only", action="append", default=[], metavar="NAME", help="run only this stage (repeatable)")
    parser.add_argument("--list", action="store_true", help="list the stages and what a rerun would do with each (done, to do, resumes, redo and why), then exit")
    args = parser.parse_args(argv)
    config = PipelineConfig.from_yaml(args.config)
    for assignment in args.assignments:
        key, equals, value = assignment.partition("=")
        if not equals or key not in SETTABLE_KEYS:
            parser.error(f"--set {assignment!r}: use KEY=VALUE with KEY one of {sorted(SETTABLE_KEYS)}")
        setattr(config, key, yaml.safe_load(value) if key not in ("eps", "train_eps") else value)
    if args.output_dir:
        config.output_dir = args.output_dir
    if args.list:
        for stage, state in stage_states(config):
            print(f"{stage.name:24s} {stage.directory}  {state}")
        return 0
    try:
        run_pipeline(config, force=args.force, force_stages=tuple(args.force_stage), only=tuple(args.only))
    except StageFailed as failure:
        print(f"adpo run: {failure}; its error is above. Run the same command again to resume from that stage.",
              file=sys.stderr)
        return failure.code
    return 0


if __name__ == "__main__":
    from adpo.runtime import run_as_process

    sys.exit(run_as_process(main))
