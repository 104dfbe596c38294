import os
import stat

import pytest

from adpo.io import atomic_directory, atomic_file, write_json_atomic


def test_a_failed_write_leaves_the_previous_directory_intact(tmp_path):
    out = tmp_path / "model"
    with atomic_directory(out) as staging:
        (staging / "weights").write_text("v1")
    with pytest.raises(RuntimeError):
        with atomic_directory(out) as staging:
            (staging / "weights").write_text("half")
            raise RuntimeError("killed mid-write")
    assert (out / "weights").read_text() == "v1"
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # no staging debris


def test_outputs_get_ordinary_permissions_and_overwrite_is_explicit(tmp_path):
    out = tmp_path / "encoder"
    with atomic_directory(out) as staging:
        (staging / "config.json").write_text("{}")
    assert stat.S_IMODE(out.stat().st_mode) & 0o055  # readable by others, unlike mkdtemp's 0700
    with pytest.raises(FileExistsError, match="already exists"):
        with atomic_directory(out, overwrite=False):
            pass
    path = write_json_atomic(tmp_path / "r.json", {"a": 1})
    assert path.read_text().strip() == '{\n  "a": 1\n}'


def test_atomic_file_gives_the_umask_mode_and_leaves_nothing_on_failure(tmp_path):
    previous = os.umask(0o022)
    try:
        with atomic_file(tmp_path / "shard.parquet") as temporary:
            temporary.write_bytes(b"data")
        assert stat.S_IMODE((tmp_path / "shard.parquet").stat().st_mode) == 0o644  # not mkstemp's 0600
        with pytest.raises(RuntimeError):
            with atomic_file(tmp_path / "other.parquet") as temporary:
                temporary.write_bytes(b"half")
                raise RuntimeError("killed")
    finally:
        os.umask(previous)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["shard.parquet"]


def test_eval_plots_and_converted_encoders_follow_the_umask_too(tmp_path):
    import torch

    from adpo.eval.plots import Curve, plot_metric_vs_eps
    from adpo.openclip import save_state_dict_file

    previous = os.umask(0o027)
    try:
        written = [save_state_dict_file({"w": torch.zeros(2)}, tmp_path / "enc.safetensors"),
                   plot_metric_vs_eps([Curve("m", [0, 2], [0.9, 0.5])], tmp_path / "plot.png", "accuracy")]
    finally:
        os.umask(previous)
    assert {path.name: oct(stat.S_IMODE(path.stat().st_mode)) for path in written} == {
        "enc.safetensors": "0o640", "plot.png": "0o640"}
