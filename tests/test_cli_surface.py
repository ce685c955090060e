"""The command line's surface: per-strategy help, shell completion, --json on every command."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from workers.cli import build_parser
from workflows import strategies

from .realenv import DOMCAPTURE

REPO = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONPATH": str(REPO)}


def _run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([DOMCAPTURE, *args], env=env or ENV, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("name", sorted(strategies.DEFINITIONS))
def test_submit_strategy_help_shows_only_its_options(name):
    out = _run("submit", name, "--help")
    assert out.returncode == 0, out.stderr
    defn = strategies.DEFINITIONS[name]
    own = {f"--{o.name.replace('_', '-')}" for o in defn.options}
    others = {f"--{o.name.replace('_', '-')}" for d in strategies.DEFINITIONS.values() for o in d.options} - own
    for flag in own:
        assert flag in out.stdout, flag
    for flag in others:
        assert f"{flag} " not in out.stdout and f"{flag}\n" not in out.stdout, flag
    assert defn.summary.split(";")[0][:30] in " ".join(out.stdout.split())


def test_strategy_help_shows_defaults():
    out = _run("submit", "snapshot-backup", "--help").stdout
    text = " ".join(out.split())
    assert "(default try)" in text and "(default 10)" in text and "(default 600)" in text
    assert "(default 3600)" in text  # --timeout


def test_every_command_takes_json():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    for name, p in sub.choices.items():
        if name in ("submit", "policy", "host", "token"):  # groups: each of their commands takes it
            strat = next(a for a in p._actions if a.dest in ("strategy", "policy_command", "host_command",
                                                             "token_command"))
            for sname, sp in strat.choices.items():
                assert any("--json" in a.option_strings for a in sp._actions), sname
        else:
            assert any("--json" in a.option_strings for a in p._actions), name


def _complete(words: list[str]) -> list[str]:
    script = _run("completion", "bash").stdout
    quoted = " ".join(f"'{w}'" for w in words)
    bash = (f"{script}\nCOMP_WORDS=({quoted}); COMP_CWORD={len(words) - 1}; _domcapture; "
            "printf '%s\\n' \"${COMPREPLY[@]}\"")
    out = subprocess.run(["bash", "-c", bash], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    return [w for w in out.stdout.split("\n") if w]


def test_bash_completion():
    assert _complete(["domcapture", "sh"]) == ["show"]
    assert _complete(["domcapture", "submit", "snapshot-b"]) == ["snapshot-backup"]
    assert _complete(["domcapture", "submit", "snapshot-backup", "--q"]) == ["--quiesce"]
    assert _complete(["domcapture", "submit", "snapshot-backup", "--quiesce", ""]) == ["off", "try", "require"]
    # a value of an option is skipped: the strategy is still recognised after --domain VALUE
    assert _complete(["domcapture", "--log-level", "INFO", "submit", "restore", "--domain", "d", "--de"]) == \
        ["--define"]
    assert _complete(["domcapture", "list", "--status", "needs"]) == ["needs_attention"]
    # restore has no --bandwidth
    assert _complete(["domcapture", "submit", "restore", "--ba"]) == []


def test_completion_json():
    doc = json.loads(_run("completion", "bash", "--json").stdout)
    assert doc["shell"] == "bash" and "complete -F _domcapture domcapture" in doc["script"]


@pytest.mark.real
def test_recovery_once_json(redis_client, prefix):
    env = {**ENV, "DOMCAPTURE_PREFIX": prefix, "DOMCAPTURE_QUEUE": f"{prefix}-q"}
    out = _run("recovery", "--once", "--json", env=env)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == []


@pytest.mark.real
def test_an_unexpected_error_is_one_line_and_debug_shows_the_traceback(redis_client, prefix, libvirt_uri):
    # a damaged entry in the checkpoint store: nothing maps its JSONDecodeError
    redis_client.hset(f"{prefix}:ckpt:{libvirt_uri}|dctest-nowhere", "c1", b"{damaged")
    env = {**ENV, "DOMCAPTURE_PREFIX": prefix, "LIBVIRT_DEFAULT_URI": libvirt_uri}
    out = _run("checkpoints", "--domain", "dctest-nowhere", env=env)
    assert out.returncode == 1
    assert out.stderr.count("\n") == 1 and "Traceback" not in out.stderr
    assert out.stderr.startswith("domcapture: error: JSONDecodeError: ") and "--debug" in out.stderr
    out = _run("--debug", "checkpoints", "--domain", "dctest-nowhere", env=env)
    assert out.returncode == 1
    assert out.stderr.startswith("Traceback (most recent call last):")
    assert out.stderr.splitlines()[-1].startswith("domcapture: error: JSONDecodeError: ")
