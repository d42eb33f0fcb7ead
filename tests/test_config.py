"""Config loading: types, overrides, and rejection of impossible values."""

import subprocess
import sys
import time
from pathlib import Path

import pytest

from src.config import ConfigError, config_from_dict, dump_config, load_config

ROOT = Path(__file__).resolve().parents[1]


def test_all_shipped_configs_load():
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        cfg = load_config(path)
        assert cfg.run_name == path.stem
        assert cfg.model.num_params() > 0


def test_sizes_of_presets():
    sizes = {
        n: load_config(ROOT / f"configs/{n}.yaml").model.num_params() / 1e6
        for n in ("model_config_small", "medium", "large")
    }
    assert 20 < sizes["model_config_small"] < 30, sizes
    assert 110 < sizes["medium"] < 140, sizes
    assert 700 < sizes["large"] < 820, sizes


def test_scientific_notation_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("training:\n  learning_rate: 3e-4\n  max_steps: 1e3\n")
    cfg = load_config(path, ["training.batch_size=4", "model.qk_norm=true"])
    assert cfg.training.learning_rate == pytest.approx(3e-4)
    assert cfg.training.max_steps == 1000 and isinstance(cfg.training.max_steps, int)
    assert cfg.training.batch_size == 4 and cfg.model.qk_norm is True
    assert load_config(None, ["run_name=x"]).run_name == "x"


def test_default_ffn_dim_rounds_to_256():
    cfg = config_from_dict({"model": {"d_model": 384}})
    assert cfg.model.ffn_dim == 1024  # 8/3 * 384 = 1024
    cfg = config_from_dict({"model": {"d_model": 500, "n_heads": 10}})
    assert cfg.model.ffn_dim % 256 == 0 and cfg.model.ffn_dim >= 8 * 500 / 3


@pytest.mark.parametrize(
    "data, needle",
    [
        ({"model": {"d_model": 100, "n_heads": 3}}, "divisible by model.n_heads"),
        ({"model": {"d_model": 96, "n_heads": 32}}, "must be even for RoPE"),
        ({"model": {"n_heads": 12, "n_kv_heads": 5}}, "must divide model.n_heads"),
        ({"model": {"n_layers": 0}}, "model.n_layers=0"),
        ({"model": {"vocab_size": -1}}, "model.vocab_size=-1"),
        ({"training": {"learning_rate": 0}}, "training.learning_rate=0"),
        ({"training": {"learning_rate": "fast"}}, "expected a number"),
        ({"training": {"batch_size": 2.5}}, "expected an integer"),
        ({"model": {"qk_norm": "yes"}}, "expected true or false"),
        ({"training": {"learnig_rate": 1e-3}}, "'learnig_rate'"),
        ({"modle": {}}, "'modle'"),
        ({"training": {"precision": "fp8"}}, "training.precision"),
        ({"training": {"schedule": "linear"}}, "must be one of cosine, wsd"),
        ({"training": {"decay_fraction": 1.5}}, "training.decay_fraction=1.5"),
        ({"training": {"decay_fraction": -0.1}}, "must be in [0, 1]"),
    ],
)
def test_rejections_name_key_value_rule(data, needle):
    with pytest.raises(ConfigError) as err:
        config_from_dict(data)
    assert needle in str(err.value)


def test_schedule_keys_default_and_override():
    t = config_from_dict({}).training
    assert (t.schedule, t.decay_fraction) == ("cosine", 0.2)  # today's schedule
    t = config_from_dict(
        {}, ["training.schedule=wsd", "training.decay_fraction=1e-1"]
    ).training
    assert (t.schedule, t.decay_fraction) == ("wsd", 0.1)


def test_bad_override_syntax():
    with pytest.raises(ConfigError, match="SECTION.KEY=VALUE"):
        config_from_dict({}, ["training.learning_rate"])
    with pytest.raises(ConfigError, match="not a section"):
        config_from_dict({"run_name": "a"}, ["run_name.x=1"])


def test_dump_round_trips(tmp_path):
    cfg = load_config(ROOT / "configs/tiny.yaml")
    path = tmp_path / "resolved.yaml"
    path.write_text(dump_config(cfg))
    assert load_config(path) == cfg


def test_cli_rejects_before_allocation(tmp_path):
    """The real CLI: exit 2, the rule in stderr, no traceback, well under a second
    of work after interpreter start-up, and nothing written."""
    start = time.perf_counter()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "src.train",
            "--config",
            str(ROOT / "configs/tiny.yaml"),
            "--set",
            "model.n_kv_heads=3",
            "--set",
            f"checkpoint.dir={tmp_path}/ck",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    elapsed = time.perf_counter() - start
    assert proc.returncode == 2, proc.stderr
    assert "model.n_kv_heads=3" in proc.stderr and "must divide" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "ck").exists()
    assert elapsed < 10, elapsed


def test_cli_missing_config_file(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "src.train", "--config", str(tmp_path / "no.yaml")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2 and "config file not found" in proc.stderr
    assert "Traceback" not in proc.stderr
