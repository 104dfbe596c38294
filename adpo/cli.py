"""The ``adpo`` command: one entry point, one subcommand per stage.

Each stage lives in its own package and exposes ``main(argv) -> int``; this module only dispatches
(lazily, so ``adpo --help`` stays fast and a stage's optional dependencies are imported only when used).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# subcommand -> (module with main(argv), one-line help)
STAGES: dict[str, tuple[str, str]] = {
    "run": ("adpo.pipeline", "run the whole pipeline (pairs -> AdPO/FARE/TeCoA -> transfer -> eval) from one config"),
    "pairs": ("pairs.cli", "generate a preference dataset: clean-image answers (chosen) vs adversarial-image answers (rejected)"),
    "train": ("trainers.cli", "train a robust encoder or LVLM: adpo | fare | tecoa | simclip | mmcoa | deltaclip | instruct | classifier"),
    "transfer": ("transfer.cli", "graft a trained encoder into a (larger) LVLM, convert formats, verify"),
    "eval": ("adpo.eval.cli", "evaluate clean and adversarial robustness; write JSON/Markdown reports and plots"),
}


def _commands() -> dict[str, tuple[str, str]]:
    """The stages, then the commands plugins add (the bundled world's ``adpo world``; see :mod:`adpo.plugins`)."""
    from adpo.plugins import plugins

    commands = dict(STAGES)
    for name, plugin in plugins().items():
        if plugin.command:
            commands.setdefault(name, (plugin.command, plugin.summary))  # a stage's name is never taken over
    return commands


def _parser(commands: dict[str, tuple[str, str]]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="adpo",
        description=(
            "Adversarially robust LLaVA-family vision-language models by preference optimisation (AdPO),\n"
            "beside the defences it grows from (FARE, TeCoA, Sim-CLIP, MMCoA, ΔCLIP, adversarial instruction\n"
            "tuning). Every stage reads a YAML config (--config) and writes Hugging Face-format outputs.\n"
            "Run `adpo <stage> --help` for a stage's options."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Start with: adpo run --config configs/quickstart.yaml   (offline, on the bundled world)" + _plugin_names(),
    )
    parser.add_argument("--version", action="version", version=f"adpo {_version()}")
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback of a config error instead of its one line (same as ADPO_DEBUG=1)")
    sub = parser.add_subparsers(dest="stage", metavar="<stage>")
    for name, (_, help_text) in commands.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def _plugin_names() -> str:
    """The model and data names plugins add, for the epilog (a stage's model or data key takes them)."""
    from adpo.plugins import plugins

    lines = []
    for scheme, plugin in plugins().items():
        names = [f"{scheme}:{model}" for model in plugin.model_names]
        if plugin.open_source is not None:
            names += [scheme, f"{scheme}:<split>"]
        if names:
            lines.append(f"  {scheme}: {', '.join(names)}")
    return "\n\nNames plugins add (usable as a model or data in any stage):\n" + "\n".join(lines) if lines else ""


def _version() -> str:
    from adpo import __version__

    return __version__


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--debug"]:
        from adpo.errors import DEBUG_ENV

        os.environ[DEBUG_ENV] = "1"  # read by run_as_process when the stage fails
        argv = argv[1:]
    commands = _commands()
    parser = _parser(commands)
    if not argv or argv[0] not in commands:
        parser.parse_args(argv or ["--help"])  # prints help / version / the unknown-stage error and exits
        return 2
    stage, rest = argv[0], argv[1:]
    module_name, _ = commands[stage]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if error.name and (module_name == error.name or module_name.startswith(error.name + ".")):
            print(f"adpo {stage}: not yet available in this version ({module_name} is missing)", file=sys.stderr)
            return 2
        raise
    return int(module.main(rest) or 0)


def console_script() -> None:
    """The installed ``adpo`` command: ``main`` as a whole process (see :func:`adpo.runtime.run_as_process`)."""
    from adpo.runtime import run_as_process

    sys.exit(run_as_process(main))


if __name__ == "__main__":
    console_script()
