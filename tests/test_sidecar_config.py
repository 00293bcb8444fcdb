"""The sidecar's settings: one YAML source (pydantic-settings'), the audit section nested on the
writer's own model, the stream fields shared with the taps."""

from __future__ import annotations

from pathlib import Path

import pytest

from monitor.audit.config import AuditConfig, TrailSettings
from monitor.config import StreamSettings
from monitor.errors import ConfigError
from monitor.sidecar.config import AuditSettings, SidecarSettings, load_settings


def test_a_yaml_file_sets_nested_keys_and_the_environment_overrides_it(monkeypatch: pytest.MonkeyPatch,
                                                                        tmp_path: Path) -> None:
    """YAML values reach nested sections; LAYERWATCH_* variables win over the file."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text("stream: s:from-file\naudit:\n  fsync: every_n\n  fsync_every_n: 7\nbaseline:\n  alpha: 0.02\n")
    monkeypatch.setenv("LAYERWATCH_AUDIT__FSYNC_EVERY_N", "9")
    s = load_settings(cfg)
    assert (s.stream, s.audit.fsync, s.audit.fsync_every_n, s.baseline.alpha) == ("s:from-file", "every_n", 9, 0.02)


@pytest.mark.parametrize(("text", "message"), [(None, "no such file"), ("- 1\n- 2\n", "top level must be a mapping"),
                                               ("a: [1\n", "is not valid YAML")])
def test_a_bad_config_file_is_a_config_error_naming_it(tmp_path: Path, text: str | None, message: str) -> None:
    """A missing file, a file that is not YAML or not a mapping fails at start-up, naming the file."""
    cfg = tmp_path / "c.yaml"
    if text is not None:
        cfg.write_text(text)
    with pytest.raises(ConfigError, match=rf"config file {cfg}.*{message}|config file {cfg}: {message}"):
        load_settings(cfg)


def test_the_audit_section_is_the_writers_settings_with_sidecar_defaults() -> None:
    """Every audit setting of the writer is a sidecar setting (nothing copied by hand); only the
    head store defaults to 'auto', which the writer itself refuses."""
    assert issubclass(AuditSettings, TrailSettings) and issubclass(AuditConfig, TrailSettings)
    assert set(TrailSettings.model_fields) == set(AuditSettings.model_fields)
    assert AuditSettings().head_store == "auto"
    assert AuditSettings().writer_config("w", auto_head_store="file").head_store == "file"
    with pytest.raises(ValueError, match="head_store 'auto'"):
        AuditConfig(directory=Path("x"), writer_id="w", head_store="auto")


def test_audit_checks_run_when_the_settings_load(tmp_path: Path) -> None:
    """A short HMAC key fails when the settings load, naming audit.hmac_key, not later in the writer."""
    with pytest.raises(ConfigError, match=r"audit.*hmac_key must be at least 16 bytes"):
        load_settings(audit={"directory": tmp_path, "hmac_key": "short"})


def test_stream_fields_are_the_shared_stream_settings() -> None:
    """The sidecar's stream and stream_maxlen are StreamSettings' (same defaults and bounds as the taps')."""
    assert issubclass(SidecarSettings, StreamSettings)
    with pytest.raises(ConfigError, match="stream_maxlen.*LAYERWATCH_STREAM_MAXLEN"):
        load_settings(stream_maxlen=5)
