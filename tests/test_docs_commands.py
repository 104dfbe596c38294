"""Every command the README and docs show still names what exists: its config files, its ``adpo`` command or trainer,
its ``python -m`` module; and every pipeline config (configs/*.yaml) builds its stages. Commands are not run here (the
quickstart and the world tests run the main ones); placeholders (``<setup>``) and files a run writes are skipped."""

import importlib.util
import re
from pathlib import Path

import pytest

from adpo import pipeline
from adpo.cli import STAGES
from trainers.cli import METHODS

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
COMMAND = re.compile(r"(?:\.venv/bin/)?(adpo|accelerate launch|torchrun|python -m)\s[^`|#\n]*")
WRITTEN_BY_A_RUN = ("outputs/", "runs/", "/root/", "/tmp/")


def _commands() -> list[tuple[str, str]]:
    found = []
    for path in DOCS:
        text = re.sub(r"\\\n\s*", " ", path.read_text(encoding="utf-8"))  # a command continued over lines is one line
        blocks = re.findall(r"```[a-z]*\n(.*?)```", text, flags=re.S)
        spans = re.findall(r"`([^`\n]+)`", re.sub(r"```.*?```", "", text, flags=re.S))
        for code in [*blocks, *spans]:
            found += [(path.name, match.group(0).strip()) for line in code.splitlines() for match in COMMAND.finditer(line)
                      if match.start() == len(line) - len(line.lstrip())]  # a command starts its line
    return found


COMMANDS = _commands()


def _files(command: str) -> list[str]:
    return [path for path in re.findall(r"--config(?:_file)?[ =](\S+)", command)
            if "<" not in path and not path.startswith(WRITTEN_BY_A_RUN)]


def test_the_docs_show_commands():
    assert len(COMMANDS) > 50 and any("adpo run --config configs/quickstart.yaml" in c for _, c in COMMANDS)


@pytest.mark.parametrize("doc, command", [c for c in COMMANDS if _files(c[1])], ids=lambda value: value[:60])
def test_every_config_a_command_reads_exists(doc, command):
    missing = [path for path in _files(command) if not (REPO / path).is_file()]
    assert missing == [], f"{doc}: {command}"


def test_every_command_names_an_adpo_command_a_trainer_or_a_module():
    wrong = []
    for doc, command in COMMANDS:
        words = command.split()
        if words[0].endswith("adpo") and len(words) > 1 and not words[1].startswith(("-", "<")):
            if words[1] not in STAGES and words[1] != "world":
                wrong.append(f"{doc}: adpo {words[1]}")
            if words[1] == "train" and len(words) > 2 and not words[2].startswith(("-", "<")) and words[2] not in METHODS:
                wrong.append(f"{doc}: adpo train {words[2]}")
        for module in re.findall(r"-m\s+([\w.]+)", command):
            if module.startswith("trainers.") and module.split(".")[1] not in {*METHODS, "cli"}:
                wrong.append(f"{doc}: -m {module}")
            elif importlib.util.find_spec(module.split(".")[0]) is None:
                wrong.append(f"{doc}: -m {module}")
    assert wrong == []


@pytest.mark.parametrize("path", sorted(p.name for p in (REPO / "configs").glob("*.yaml")))
def test_every_pipeline_config_builds_its_stages(path, tmp_path):
    config = pipeline.PipelineConfig.from_yaml(REPO / "configs" / path)
    config.output_dir = str(tmp_path)
    assert pipeline.build_stages(config)
