"""The execution policy measured where the run happens (src/train/autotune.py):
the choice from a fake timer, the cache (reused, per shape, corrupt or
unwritable), forced settings, the resumed run's recorded policy, and real runs
through `python -m src.train` that measure, then reuse the cache."""

import json
import os

import pytest

from src.backend import kernels
from src.train import autotune
from src.train.autotune import Policy


@pytest.fixture(autouse=True)
def tuning_on(monkeypatch):
    """conftest turns measuring off for every other test; here it is on, and the
    kernel set chosen by a test does not leak into the next."""
    monkeypatch.delenv(autotune.ENV_OFF, raising=False)
    monkeypatch.delenv(kernels.ENV_VAR, raising=False)
    yield
    kernels.set_kernel_set(None)


def fake_timer(times: dict):
    """A measure function from {(streams, kernels): seconds}; it records calls."""
    calls = []

    def measure(p: Policy) -> float:
        calls.append(p)
        return times[(p.streams, p.kernels)]

    measure.calls = calls
    return measure


def never(p: Policy) -> float:
    raise AssertionError(f"measured {p} although it should not")


def test_candidates_vary_only_what_is_auto(tiny_config, monkeypatch):
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    cfg = tiny_config(training={"batch_size": 4})
    assert autotune.candidates(cfg) == [Policy(2, "portable"), Policy(2, "fused"),
                                        Policy(1, "portable"), Policy(1, "fused")]  # fmt: skip
    cfg.training.streams = 1
    assert autotune.candidates(cfg) == [Policy(1, "portable"), Policy(1, "fused")]
    cfg.training.streams, cfg.training.kernels = 0, "fused"
    assert autotune.candidates(cfg) == [Policy(2, "fused"), Policy(1, "fused")]
    cfg.training.kernels = "auto"
    monkeypatch.setenv(kernels.ENV_VAR, "portable")
    assert autotune.candidates(cfg) == [Policy(2, "portable"), Policy(1, "portable")]
    cfg.training.batch_size = 1  # one row: nothing to split
    assert autotune.candidates(cfg) == [Policy(1, "portable")]


def test_the_fastest_is_chosen_deterministically(tiny_config, tmp_path, monkeypatch):
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    times = {(2, "portable"): 0.30, (2, "fused"): 0.25, (1, "portable"): 0.40,
             (1, "fused"): 0.25}  # fmt: skip
    for _ in range(2):  # the same times, the same choice (ties: the earlier)
        cfg = tiny_config(training={"batch_size": 4})
        measure = fake_timer(times)
        line = autotune.tune(cfg, measure=measure, path=tmp_path / f"{_}.json")
        assert len(measure.calls) == 4
        assert (cfg.training.streams, cfg.training.kernels) == (2, "fused")
        assert kernels.kernel_set() == "fused"
        assert "2 streams, fused kernels, the fastest of 4" in line
        assert "1 stream, portable kernels: 0.400" in line


def test_the_cached_choice_is_reused_per_shape(tiny_config, tmp_path, monkeypatch):
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    path = tmp_path / "cache" / "policy.json"
    times = {(2, "portable"): 0.2, (2, "fused"): 0.3, (1, "portable"): 0.5,
             (1, "fused"): 0.6}  # fmt: skip
    cfg = tiny_config(training={"batch_size": 4})
    autotune.tune(cfg, measure=fake_timer(times), path=path)
    entry = next(iter(json.loads(path.read_text()).values()))
    assert entry["streams"] == 2 and entry["kernels"] == "portable"
    assert entry["seconds_per_step"]["1 stream, fused kernels"] == 0.6
    again = tiny_config(training={"batch_size": 4})
    line = autotune.tune(again, measure=never, path=path)
    assert "cached in" in line and again.training.streams == 2
    other = tiny_config(training={"batch_size": 4}, d_model=64)  # another shape
    measure = fake_timer(times)
    autotune.tune(other, measure=measure, path=path)
    assert len(measure.calls) == 4 and len(json.loads(path.read_text())) == 2


def test_a_corrupt_or_unwritable_cache_only_costs_a_measurement(
    tiny_config, tmp_path, monkeypatch
):
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    times = {(2, "portable"): 0.2, (2, "fused"): 0.3, (1, "portable"): 0.5,
             (1, "fused"): 0.6}  # fmt: skip
    path = tmp_path / "policy.json"
    for junk in (b"{not json", b"[1, 2]", b"\xff\xfe", b'{"x": {"streams": "a"}}'):
        path.write_bytes(junk)
        cfg = tiny_config(training={"batch_size": 4})
        measure = fake_timer(times)
        autotune.tune(cfg, measure=measure, path=path)
        assert len(measure.calls) == 4 and cfg.training.streams == 2
        assert isinstance(json.loads(path.read_text()), dict)  # rewritten whole
    blocker = tmp_path / "file"
    blocker.write_text("")
    cfg = tiny_config(training={"batch_size": 4})
    line = autotune.tune(cfg, measure=fake_timer(times), path=blocker / "policy.json")
    assert "not cached" in line and cfg.training.kernels == "portable"


def test_forced_settings_win(tiny_config, tmp_path, monkeypatch):
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    cfg = tiny_config(training={"batch_size": 4, "streams": 1, "kernels": "fused"})
    line = autotune.tune(cfg, measure=never, path=tmp_path / "p.json")
    assert line.startswith("execution policy: 1 stream, fused kernels (set in")
    assert kernels.kernel_set() == "fused" and not (tmp_path / "p.json").exists()
    cfg = tiny_config(training={"batch_size": 4, "autotune": False})
    line = autotune.tune(cfg, measure=never, path=tmp_path / "p.json")
    assert "not measured" in line and cfg.training.streams == 2
    monkeypatch.setenv(autotune.ENV_OFF, "off")
    cfg = tiny_config(training={"batch_size": 4})
    autotune.tune(cfg, measure=never, path=tmp_path / "p.json")
    assert cfg.training.kernels == "portable"  # the CPU default, unmeasured
    cfg = tiny_config(training={"batch_size": 4})
    assert "data-parallel" in autotune.tune(cfg, world=2, measure=never)


def test_a_resumed_run_keeps_its_recorded_policy(tiny_config):
    meta = {"config": {"training": {"streams": 1, "kernels": "fused"}}}
    cfg = tiny_config()
    autotune.keep_recorded(meta, cfg)
    assert (cfg.training.streams, cfg.training.kernels) == (1, "fused")
    cfg = tiny_config(training={"streams": 2, "kernels": "portable"})
    autotune.keep_recorded(meta, cfg)  # set explicitly now: the user's choice
    assert (cfg.training.streams, cfg.training.kernels) == (2, "portable")
    cfg = tiny_config()
    autotune.keep_recorded({"config": {"training": {}}}, cfg)  # an older checkpoint
    assert (cfg.training.streams, cfg.training.kernels) == (0, "auto")
    assert not cfg.training.autotune  # it ran with the unmeasured defaults


def test_a_real_run_measures_once_then_starts_at_once(
    train_tiny, tmp_path, monkeypatch
):
    """`python -m src.train` with measuring on: the first run times the candidate
    policies and records the winner in its config; a second run of the same shape
    takes it from the cache; resuming keeps the recorded one."""
    monkeypatch.setenv(autotune.CACHE_ENV, str(tmp_path / "cache"))
    ck, logs = train_tiny(tmp_path / "a", training__max_steps=4, eval__interval=0)
    text = (logs / "train.log").read_text()
    assert "the fastest of" in text and "measured in" in text, text
    cfg = (logs / "config.yaml").read_text()
    assert "kernels: auto" not in cfg and "streams: 0" not in cfg
    entries = json.loads((tmp_path / "cache" / "policy.json").read_text())
    assert len(entries) == 1
    ck2, logs2 = train_tiny(tmp_path / "b", training__max_steps=4, eval__interval=0)
    assert "cached in" in (logs2 / "train.log").read_text()
    _, logs3 = train_tiny(tmp_path / "b", "--resume", "auto", training__max_steps=6,
                          eval__interval=0)  # fmt: skip
    resumed = (logs3 / "train.log").read_text().split("resumed from")[-1]
    assert "config change" not in resumed.split("\n")[0]
