"""What every trainer needs from the machine it runs on, the checks every trainer config runs before any model
loads, what a trainer writes beyond ``encoder/`` at its end, and how a command runs as a whole process."""

from __future__ import annotations

import copy
import json
import logging
import os
import sys
import zlib
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

logger = logging.getLogger(__name__)

HALF_DTYPES = ("bfloat16", "bf16", "float16", "fp16")
# Where every trainer writes what it trained, in a run directory and in each of its checkpoints.
ENCODER_DIRNAME = "encoder"
# Where the whole-CLIP trainers (MMCoA, ΔCLIP) write the CLIPModel they trained, beside encoder/.
CLIP_DIRNAME = "clip"
LVLM_DIRNAME = "lvlm"


def has_accelerator() -> bool:
    """Whether torch sees a GPU (or another accelerator)."""
    accelerator = getattr(torch, "accelerator", None)
    return bool(accelerator.is_available()) if accelerator is not None else torch.cuda.is_available()


def needs_cpu_process_group() -> bool:
    """Several processes launched (accelerate/torchrun) on a machine without an accelerator.

    Trainer's processes join a (gloo) process group only with ``use_cpu``; without it each would train
    alone on all the data.
    """
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and not has_accelerator()


def fit_precision_to_device(args: Any, dtype_fields: Sequence[str]) -> None:
    """Make a trainer config written for GPUs run on this machine; call before ``TrainingArguments.__post_init__``.

    Without an accelerator, a config asking for half precision (``bf16``/``fp16``/``tf32``, or a half dtype
    in one of ``dtype_fields``) and not setting ``use_cpu`` itself becomes a CPU smoke test: ``use_cpu``, mixed
    precision off, those dtypes float32, announced by one warning. (TrainingArguments would refuse bf16
    without a GPU; CPU half precision is slow and not what the config was tuned with.) A config that sets
    ``use_cpu: true`` keeps the precision it asks for. Launched as several CPU processes, ``use_cpu`` is
    switched on too, so they form a (gloo) process group. With an accelerator nothing changes.
    """
    if has_accelerator():
        return
    if not args.use_cpu:
        flags = [name for name in ("bf16", "fp16", "bf16_full_eval", "fp16_full_eval", "tf32") if getattr(args, name)]
        dtypes = [name for name in dtype_fields if str(getattr(args, name) or "").lower() in HALF_DTYPES]
        if flags or dtypes:
            for name in flags:
                setattr(args, name, None if name == "tf32" else False)
            changed = [f"{name}: false" for name in flags] + [f"{name}: float32" for name in dtypes]
            for name in dtypes:
                setattr(args, name, "float32")
            args.use_cpu = True
            logger.warning("no GPU found: running this config as a CPU smoke test in float32 (use_cpu: true, %s); "
                           "set use_cpu: true yourself to keep the config's precision on CPU", ", ".join(changed))
    if not args.use_cpu and needs_cpu_process_group():
        args.use_cpu = True


def check_training_arguments(args: Any, dtype_keys: Sequence[str] = (), model_key: str = "model_name_or_path") -> None:
    """The checks every trainer's config runs before ``TrainingArguments.__post_init__`` and before any model loads:
    a :class:`adpo.errors.UsageError` naming the key, the value and the fix.

    ``max_steps`` must be -1 (train ``num_train_epochs``) or >= 1 (transformers reads any other value as "use the
    epochs" without a word); batch sizes and accumulation >= 1; the dtypes named in ``dtype_keys`` must be known; a
    model named by a path must exist; the output directory must be writable (tried, see
    :func:`adpo.io.check_writable`).
    """
    from adpo.errors import UsageError
    from adpo.io import check_writable
    from adpo.models import resolve_dtype

    if args.max_steps != -1 and args.max_steps < 1:
        raise UsageError(f"max_steps={args.max_steps}; use -1 to train num_train_epochs, or a number of steps >= 1")
    if args.max_steps == -1 and not args.num_train_epochs > 0:
        raise UsageError(f"num_train_epochs={args.num_train_epochs}; must be > 0 (or set max_steps >= 1)")
    for key in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
        if getattr(args, key) < 1:
            raise UsageError(f"{key}={getattr(args, key)}; must be >= 1")
    for key in dtype_keys:
        try:
            resolve_dtype(getattr(args, key))
        except ValueError as error:
            raise UsageError(f"{key}: {error}") from None
    model = getattr(args, model_key) or ""
    if model.startswith((".", "/", "~")) and not Path(model).expanduser().exists():
        raise UsageError(f"{model_key}={model!r} looks like a path but does not exist; pass an existing model "
                         "directory, a hub id or a world model")
    if args.output_dir:
        check_writable(args.output_dir, "output_dir")


def load_lvlm_for_tower_training(name_or_path: str, dtype: str | torch.dtype | None, keep_tower_dtype: bool = False):
    """An LVLM in ``dtype`` whose vision tower holds float32 master weights equal to the checkpoint's own values.

    Loaded straight in ``dtype``, the tower would be rounded whenever ``dtype`` differs from the stored one
    (fp32 -> bf16, even fp16 -> bf16), and every tower tensor would be saved rounded, frozen ones included.
    So the model is loaded as stored, the tower's weights are kept aside in float32, the model is cast and
    the tower gets them back. ``keep_tower_dtype`` trains the tower in ``dtype`` instead (no master weights).
    """
    from adpo.models import load_lvlm, resolve_dtype
    from adpo.tower import find_vision_tower

    model, processor = load_lvlm(name_or_path)
    tower = find_vision_tower(model)
    exact = None if keep_tower_dtype else {key: value.float() for key, value in tower.state_dict().items()}
    if dtype is not None:
        model.to(resolve_dtype(dtype))
    if exact is not None:
        tower.float().load_state_dict(exact)
    return model, processor


STAGE_OUTPUTS = "adpo_outputs.json"


def write_stage_outputs(output_dir: str | os.PathLike, **outputs: str | os.PathLike) -> Path:
    """Declare what a stage wrote (``encoder``, ``lvlm``, ``dataset``, ``model``, ``report``: each a path that exists,
    as the caller opens it) in ``<output_dir>/adpo_outputs.json``, stored relative to ``output_dir``: what ``adpo run``
    and users read instead of guessing."""
    from adpo.io import write_json_atomic

    root = Path(output_dir)
    missing = [f"{name}={path}" for name, path in outputs.items() if not Path(path).exists()]
    if missing:  # a bare name would be read from the working directory: the declaration would point elsewhere
        raise FileNotFoundError(f"cannot declare outputs of {root} that do not exist: {', '.join(missing)}; pass each "
                                "as a path the caller can open (under output_dir), after writing it")
    declared = {name: os.path.relpath(Path(path), root) for name, path in outputs.items()}
    return write_json_atomic(root / STAGE_OUTPUTS, declared)


def stage_output(output_dir: str | os.PathLike, name: str) -> Path:
    """The output ``name`` a stage declared in ``output_dir`` (see :func:`write_stage_outputs`)."""
    from adpo.errors import UsageError

    declared_file = Path(output_dir) / STAGE_OUTPUTS
    try:
        declared = json.loads(declared_file.read_text())
    except FileNotFoundError:
        raise UsageError(f"{output_dir} declares no outputs ({STAGE_OUTPUTS} is missing): did its stage finish?") from None
    if name not in declared:
        raise UsageError(f"{output_dir} declares no {name!r} output; it has {sorted(declared)}")
    path = Path(output_dir) / declared[name]
    if not path.exists():
        raise UsageError(f"{output_dir} declares its {name!r} output at {path}, which does not exist: was it moved or "
                         "deleted? Rerun the stage that wrote it (adpo run --force-stage NAME)")
    return path


def declared_outputs_of(inputs: dict[str, tuple[str | os.PathLike, str]], **fixed: Any) -> Callable[[dict[str, Any]], dict[str, Any]]:
    """For a stage whose config is completed when it runs: each key of ``inputs`` set to the output ``(run
    directory, output name)`` that run declared (:func:`stage_output`), and the ``fixed`` keys."""
    def resolve(stage_config: dict[str, Any]) -> dict[str, Any]:
        declared = {key: str(stage_output(run, output)) for key, (run, output) in inputs.items()}
        return stage_config | declared | fixed
    return resolve


def checkpoint_encoder_dir(checkpoint: str | os.PathLike) -> Path:
    """The trained encoder inside a checkpoint (``<checkpoint>/encoder``), or an error naming what is missing."""
    encoder_dir = Path(checkpoint) / ENCODER_DIRNAME
    if not (encoder_dir / "config.json").is_file():
        raise FileNotFoundError(f"{checkpoint} holds no {ENCODER_DIRNAME}/config.json, so there is no trained "
                                "encoder to resume from; resume from a checkpoint written by this adpo version, "
                                "or start afresh")
    return encoder_dir


def derived_seed(*parts: Any, separator: str = ":") -> int:
    """The seed of one random draw (an attack's start, a sampled answer), from the parts that identify it — (seed,
    step, micro-batch, rank, purpose) in the trainers, (seed, shard, batch, purpose) in ``adpo pairs`` —, the same in
    every process and Python run, so a resumed run draws what an uninterrupted one would."""
    return zlib.crc32(separator.join(str(part) for part in parts).encode())


def resume_checkpoint(value: str | bool | None, output_dir: str | os.PathLike) -> str | None:
    """``resume_from_checkpoint`` as every trainer reads it: unset or false starts afresh; ``true`` / ``last`` /
    ``auto`` is the newest complete checkpoint in ``output_dir`` (None, with a log line, when there is none yet);
    anything else is a checkpoint directory."""
    if value is None or value is False or str(value).lower() in ("", "false", "no", "none"):
        return None
    if value is True or str(value).lower() in ("true", "yes", "last", "auto"):
        found = last_complete_checkpoint(output_dir)
        if found is None:
            logging.getLogger(__name__).info("no checkpoint in %s: starting from scratch", output_dir)
        return found
    return str(value)


def last_complete_checkpoint(output_dir: str | os.PathLike) -> str | None:
    """The newest ``checkpoint-N`` in ``output_dir`` that is complete (None: there is none): what
    ``resume_from_checkpoint: last`` resumes from in every trainer.

    transformers' ``get_last_checkpoint`` takes the highest N even when that save was cut short (killed, disk
    full). Here a checkpoint is complete when it holds ``trainer_state.json`` (the Trainer writes it last) and no
    empty file (the encoder in ``encoder/`` included); newer incomplete ones are skipped with a warning.
    """
    from transformers.trainer import TRAINER_STATE_NAME
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    directory = Path(output_dir)
    if not directory.is_dir():
        return None
    numbered = [(int(path.name.rsplit("-", 1)[1]), path) for path in directory.glob(f"{PREFIX_CHECKPOINT_DIR}-*")
                if path.is_dir() and path.name.rsplit("-", 1)[1].isdigit()]
    for _, checkpoint in sorted(numbered, reverse=True):
        empty = sorted(path.relative_to(checkpoint).as_posix() for path in checkpoint.rglob("*")
                       if path.is_file() and path.stat().st_size == 0)
        if (checkpoint / TRAINER_STATE_NAME).is_file() and not empty:
            return os.fspath(checkpoint)
        why = f"empty file(s): {', '.join(empty[:3])}" if empty else f"no {TRAINER_STATE_NAME}"
        logger.warning("not resuming from %s: incomplete checkpoint (%s); trying an older one", checkpoint, why)
    return None


def write_requested_exports(
    output_dir: str | os.PathLike,
    encoder: torch.nn.Module,
    image_processor: Any,
    card: dict,
    *,
    base_model: str,
    save_lvlm: bool,
    encoder_copy_dtype: str | None,
    trust_remote_code: bool = False,
) -> None:
    """The final outputs a run writes besides its fp32 ``encoder/``, when its config asks for them, and the file
    declaring them all (:func:`write_stage_outputs`: ``encoder``, and ``encoder_<dtype>`` / ``lvlm`` when written).

    * ``encoder_copy_dtype``: ``<output_dir>/encoder-<dtype>/``, the trained encoder cast to that dtype.
    * ``save_lvlm``: ``<output_dir>/lvlm/``, the original LVLM ``base_model`` loaded as stored (its own dtype)
      with the trained tower put in, so every tensor outside the tower is bit-identical to the original's.
    """
    from adpo.io import atomic_directory
    from adpo.encoder_io import put_encoder, save_encoder
    from adpo.models import load_lvlm, resolve_dtype

    out = Path(output_dir)
    outputs = {"encoder": out / ENCODER_DIRNAME}
    if encoder_copy_dtype is not None:
        dtype = resolve_dtype(encoder_copy_dtype)
        name = str(dtype).removeprefix("torch.")
        copied = copy.deepcopy(encoder).to(dtype)
        outputs[f"encoder_{name}"] = save_encoder(copied, out / f"encoder-{name}", image_processor, {**card, "dtype": name})
    if save_lvlm:
        model, processor = load_lvlm(base_model, trust_remote_code=trust_remote_code)
        put_encoder(model, encoder)  # cast to the tower's stored dtype
        with atomic_directory(out / LVLM_DIRNAME) as staging:
            model.save_pretrained(staging, safe_serialization=True)
            processor.save_pretrained(staging)
        outputs["lvlm"] = out / LVLM_DIRNAME
    write_stage_outputs(out, **outputs)


def run_as_process(main) -> int:
    """Run a command's ``main()`` as the whole process: return its exit code after leaving the process group.

    An error the user can act on (:func:`adpo.errors.error_line`: a :class:`adpo.errors.UsageError`, a full disk, a
    permission refused) is printed as one line, ``adpo: error: ...``, with exit code 2 for a usage error and 1 for
    the others; ``ADPO_DEBUG=1`` keeps the traceback. Any other exception is a bug and keeps its traceback.

    A launched (multi-process) run that exits with its gloo/NCCL group still up can abort in the backend's
    teardown after all work is saved (seen as SIGABRT on CPU runs). Only process entry points call this (``adpo run``
    starts every stage as its own process, which calls it).
    """
    from adpo.errors import UsageError, debugging, error_line

    failed = False
    try:
        code = main()
    except (UsageError, OSError) as error:
        line = error_line(error)
        if line is None or debugging():
            raise
        print(f"adpo: error: {line}", file=sys.stderr)
        code, failed = 2 if isinstance(error, UsageError) else 1, True
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        if not failed:  # a rank that failed alone would wait for the others forever
            torch.distributed.barrier()  # no rank leaves while another still talks to it
        torch.distributed.destroy_process_group()
    return int(code or 0)
