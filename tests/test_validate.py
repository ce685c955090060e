"""The input parsers, as a library caller meets them (typed values, not only argv strings)."""

from __future__ import annotations

import math

import pytest

from workers.settings import Settings
from workflows import validate
from workflows.errors import ConfigError, InputError
from workflows.strategies import common


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, "nan", "inf", "-inf", "1e400", 0, "0", -1, "-0.5",
                                   True, None, "", "ten", [1]])
def test_seconds_refuses(value):
    with pytest.raises(InputError, match="--freeze-deadline must"):
        validate.seconds("freeze_deadline", value)


@pytest.mark.parametrize("value, expected", [(10, 10.0), ("2.5", 2.5), (" 7 ", 7.0), (0.001, 0.001)])
def test_seconds_accepts(value, expected):
    assert validate.seconds("freeze_deadline", value) == expected


def test_library_defaults_apply_only_when_absent():
    assert common.parse_seconds("commit_timeout", None, 600.0) == 600.0
    with pytest.raises(InputError):
        common.parse_seconds("commit_timeout", "", 600.0)
    with pytest.raises(InputError):
        common.parse_seconds("commit_timeout", math.nan, 600.0)


@pytest.mark.parametrize("value", [0.5, "0.5", "0.9", math.inf, math.nan, "inf", "nan", -1, "-5M", "fast", "",
                                   True, "5X", "1e3", "2000T"])
def test_bandwidth_refuses(value):
    with pytest.raises(InputError, match="--bandwidth must"):
        common.parse_bandwidth(value)


@pytest.mark.parametrize("value, expected", [(None, 0), (0, 0), ("0", 0), ("50M", 50 * 1024 ** 2), ("512K", 524288),
                                             ("1G", 1024 ** 3), ("1.5K", 1536), (1, 1), ("8MiB/s", 8 * 1024 ** 2),
                                             (1000.7, 1000)])
def test_bandwidth_accepts(value, expected):
    assert common.parse_bandwidth(value) == expected


@pytest.mark.parametrize("value", ["a\nb", "a\tb", "a\x00b", "\x1b[31m", "", "   ", 5, None])
def test_text_refuses(value):
    with pytest.raises(InputError):
        validate.text("define", value)


@pytest.mark.parametrize("value", ["0123456789ABCDEF", "0123456789abcde", "0123456789abcdef0", "dc:wf:x",
                                   "0123456789abcdef:history", "", None, 12])
def test_workflow_id_refuses(value):
    with pytest.raises(InputError, match="is not a workflow id"):
        validate.workflow_id(value)


def test_target_is_resolved_with_realpath(tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    assert common.check_target_dir(str(tmp_path / "link")) == str(real)
    with pytest.raises(InputError, match="control characters"):
        common.check_target_dir(str(real) + "\n")


@pytest.mark.parametrize("url, fragment", [
    ("http://h/0", "must start with redis://"), ("redis://h:0/0", "port 0 is out of range"),
    ("redis://h:70000/0", "Port out of range"), ("redis://h/abc", "database index 'abc'"),
    ("redis:///0", "names no host"), ("redis://h/0?db=x", "database index 'x'"),
])
def test_redis_url_refuses(url, fragment):
    with pytest.raises(InputError, match=fragment):
        validate.redis_url(url)


def test_redis_url_errors_never_show_the_password():
    with pytest.raises(InputError) as exc:
        validate.redis_url("http://user:hunter2@h/0")
    assert "hunter2" not in str(exc.value) and "***" in str(exc.value)


def test_settings_password_sources(tmp_path):
    pw = tmp_path / "pw"
    pw.write_text("s3cret\n")
    assert Settings.from_env({"DOMCAPTURE_REDIS_PASSWORD_FILE": str(pw)}).redis_password == "s3cret"
    assert Settings.from_env({"DOMCAPTURE_REDIS_PASSWORD": "x"}).redis_password == "x"
    pw.write_text("two\nlines\n")
    with pytest.raises(ConfigError, match="must hold one line"):
        Settings.from_env({"DOMCAPTURE_REDIS_PASSWORD_FILE": str(pw)})
    with pytest.raises(ConfigError, match="must not carry a password"):
        Settings.from_env({}).with_redis_url("redis://:pw@127.0.0.1:6379/0")
    assert Settings.from_env({"DOMCAPTURE_PREFIX": "dc-a"}).rq_prefix == "dc-a:rq"


def test_sentinel_url_parses_hosts_service_db_and_credentials():
    spec = validate.sentinel_url("redis+sentinel://dc:pw@10.0.0.1:26379,10.0.0.2,[::1]:26380/dcha/3")
    assert spec.sentinels == (("10.0.0.1", 26379), ("10.0.0.2", 26379), ("::1", 26380))
    assert (spec.service, spec.db, spec.username, spec.password, spec.tls) == ("dcha", 3, "dc", "pw", False)
    tls = validate.sentinel_url("rediss+sentinel://h1/dcha?ssl_ca_certs=/etc/domcapture/ca.pem")
    assert tls.tls and tls.tls_params == (("ssl_ca_certs", "/etc/domcapture/ca.pem"),) and tls.db == 0


def test_sentinel_url_errors_never_show_the_password():
    with pytest.raises(InputError) as exc:
        validate.redis_url("redis+sentinel://u:hunter2@h1,,h2/dcha")
    assert "hunter2" not in str(exc.value) and "***" in str(exc.value)


def test_replicas_acknowledge_intents_by_default_only_behind_sentinel():
    assert Settings.from_env({}).replica_acks == 0
    behind = {"DOMCAPTURE_REDIS_URL": "redis+sentinel://h1:26379/dcha/0"}
    assert Settings.from_env(behind).replica_acks == 1
    assert Settings.from_env({**behind, "DOMCAPTURE_REDIS_REPLICA_ACKS": "0"}).replica_acks == 0
    assert Settings.from_env({}).with_redis_url(behind["DOMCAPTURE_REDIS_URL"]).replica_acks == 1
