"""The plugin registry: the core resolves ``<scheme>:`` names only through it, and runs without the bundled world."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from adpo import plugins
from adpo.errors import UsageError
from adpo.plugins import Plugin, data_plugin, model_plugin, named_radius, plugin_data_hint, plugin_model_hint, split_name
from adpo.testing import tiny_llava

REPO = Path(__file__).resolve().parents[1]
STAGE_MODULES = ["adpo.cli", "adpo.pipeline", "adpo.eval.cli", "pairs.cli", "trainers.cli", "trainers.adpo", "trainers.fare",
                 "trainers.tecoa", "trainers.simclip", "trainers.mmcoa", "trainers.deltaclip", "trainers.instruct",
                 "trainers.classifier", "transfer.cli"]
# core tests that never name the world; they run again with adpo.world unimportable
CORE_TESTS = ["tests/test_core_threat.py", "tests/test_core_attacks.py", "tests/test_core_io.py", "tests/test_core_openclip.py",
              "tests/test_core_plugins.py::test_a_registered_plugin_serves_every_kind_of_name"]


@pytest.fixture
def toy_plugin(tmp_path, monkeypatch):
    """A plugin 'toy' whose one LVLM is a tiny LLaVA and whose data is an image folder."""
    from PIL import Image

    for index in range(3):
        Image.new("RGB", (8, 8), (index * 80, 0, 0)).save(tmp_path / f"{index}.png")
    model, processor = tiny_llava(seed=0)

    def open_source(split, n):
        from adpo.sources import open_source as open_any

        return open_any(os.fspath(tmp_path), n=n)

    plugin = Plugin(scheme="toy", summary="a test plugin", model_names=("tiny",), model_kind=lambda name: "lvlm",
                    load_lvlm=lambda name, dtype: (model, processor), model_identity=lambda name: f"toy-{name}-1",
                    open_source=open_source, radius=lambda: 3 / 255, default_data="toy")
    monkeypatch.setitem(plugins._registered, "toy", plugin)
    return plugin, model


def test_a_registered_plugin_serves_every_kind_of_name(toy_plugin):
    from adpo.models import load_lvlm, model_identity
    from adpo.sources import check_source, open_source
    from adpo.threat import parse_eps

    plugin, model = toy_plugin
    assert split_name("toy:tiny") == (plugin, "tiny") and split_name("toy") == (plugin, None)
    assert split_name("./toy:tiny") is None and split_name("llava-hf/llava-1.5-7b-hf") is None and split_name(3) is None
    assert load_lvlm("toy:tiny")[0] is model
    assert model_identity("toy:tiny") == "toy-tiny-1"
    assert parse_eps("toy") == pytest.approx(3 / 255) and named_radius("2/255") is None
    assert len(open_source("toy:train", n=2)) == 2 and data_plugin("toy:test") == (plugin, "test")
    check_source("toy:anything", "data")  # a plugin's data is never refused as a missing path
    assert "'toy:tiny'" in plugin_model_hint("lvlm") and "'toy:tiny'" not in plugin_model_hint("clip")
    assert "'toy' / 'toy:<split>'" in plugin_data_hint()
    with pytest.raises(UsageError, match="no model of the 'toy' plugin; its models are: toy:tiny"):
        model_plugin("toy:huge")


def test_the_bundled_world_is_a_published_plugin():
    from adpo.world import world_config

    world, rest = split_name("world:small")
    assert rest == "small" and world.model_kind("small") == "lvlm" and world.model_kind("clip") == "clip"
    assert named_radius("world") == pytest.approx(float(world_config()["working_eps"]))
    assert world.command == "adpo.world.cli" and world.default_data == "world"
    help_text = subprocess.run([sys.executable, "-m", "adpo.cli", "--help"], cwd=REPO, capture_output=True, text=True).stdout
    assert "world: world:small, world:large, world:clip, world, world:<split>" in help_text


def test_no_core_or_stage_module_names_the_world():
    offenders = []
    for path in [*(REPO / "adpo").rglob("*.py"), *(REPO / "pairs").rglob("*.py"), *(REPO / "trainers").rglob("*.py"),
                 *(REPO / "transfer").rglob("*.py")]:
        if path.relative_to(REPO).parts[:2] == ("adpo", "world"):
            continue
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if re.search(r"adpo\.world|world:|'world'|\"world\"", line):
                offenders.append(f"{path.relative_to(REPO)}:{number}: {line.strip()}")
    assert offenders == []


def test_the_core_and_every_stage_run_with_the_world_unimportable():
    env = {**os.environ, "ADPO_TEST_WITHOUT_WORLD": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": os.fspath(REPO)}
    script = ("import sys; sys.modules['adpo.world'] = None\n"
              f"import importlib; [importlib.import_module(m) for m in {STAGE_MODULES!r}]\n"
              "from adpo.plugins import plugins; from adpo.threat import parse_eps\n"
              "assert 'world' not in plugins(), plugins()\n"
              "from adpo.plugins import plugin_data_hint, plugin_model_hint\n"
              "assert plugin_model_hint() == plugin_data_hint() == ''\n"
              "try:\n    parse_eps('world')\nexcept ValueError:\n    pass\nelse:\n    raise AssertionError('world read as a radius')\n")
    imported = subprocess.run([sys.executable, "-c", script], env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert imported.returncode == 0, imported.stderr[-3000:]
    assert "adpo plugin 'world'" in imported.stderr  # left out with a warning naming it
    tests = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not world", "-k", "not world",
                            *CORE_TESTS],
                           env=env, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert tests.returncode == 0, tests.stdout[-3000:]
    assert torch.__version__  # the parent process is untouched
