"""``up``, ``status`` and ``down`` for the providers that run here, as a user types them:
the provider comes from the configuration, and each answers sensibly (for ``ssh``,
status is whether each host answers SSH with the right key)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

from joblib_cloud import cli


def _configure_ssh(monkeypatch, fleet, hosts):
    kwargs = fleet.kwargs(hosts=hosts)
    monkeypatch.setenv("JOBLIB_CLOUD_PROVIDER", "ssh")
    monkeypatch.setenv("JOBLIB_CLOUD_HOSTS", ",".join(kwargs["hosts"]))
    monkeypatch.setenv("JOBLIB_CLOUD_SSH_KEY", kwargs["ssh_key"])
    monkeypatch.setenv("JOBLIB_CLOUD_KNOWN_HOSTS", kwargs["known_hosts"])
    monkeypatch.setenv("JOBLIB_CLOUD_PYTHON", kwargs["python"])


def test_ssh_status_is_reachability_and_up_connects_every_host(fleet, monkeypatch, capsys):
    _configure_ssh(monkeypatch, fleet, fleet.hosts[:2])
    assert cli.main(["status"]) == 0
    out = capsys.readouterr().out
    for host in fleet.hosts[:2]:
        assert f"{host.spec}: reachable, host key verified, login accepted" in out
    assert cli.main(["up"]) == 0
    out = capsys.readouterr().out
    assert out.count(" workers") == 2 and "every host answered" in out
    assert cli.main(["down", "--yes"]) == 0
    assert "nothing to remove" in capsys.readouterr().out


def test_ssh_status_names_the_host_that_does_not_answer(fleet, monkeypatch, capsys):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    _configure_ssh(monkeypatch, fleet, fleet.hosts[:1])
    monkeypatch.setenv("JOBLIB_CLOUD_HOSTS",
                       f"{fleet.hosts[0].spec},{fleet.hosts[0].user}@127.0.0.1:{dead}")
    assert cli.main(["status"]) == 1
    out = capsys.readouterr().out
    assert f"{fleet.hosts[0].spec}: reachable" in out
    assert f"127.0.0.1:{dead}: NOT reachable" in out


def test_local_provider_commands_say_there_is_nothing_between_programs(monkeypatch, capsys):
    assert cli.main(["status", "--provider", "local"]) == 0
    assert "nothing to show" in capsys.readouterr().out
    assert cli.main(["down", "--provider", "local", "--yes"]) == 0
    assert "leaves nothing behind" in capsys.readouterr().out
    monkeypatch.setenv("JOBLIB_CLOUD_WORKERS_PER_HOST", "1")
    assert cli.main(["up", "--provider", "local", "-n", "2"]) == 0
    assert capsys.readouterr().out.count("1 workers") == 2


def _dead_port() -> int:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("case", ["setting", "job", "host"])
def test_a_user_error_is_one_line_and_a_documented_exit_code(case, fleet, tmp_path):
    """What the user has to fix is said on one line, without a traceback, and the exit
    code says which kind it is, as ``joblib-cloud --help`` lists them."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("JOBLIB_CLOUD_")}
    env["JOBLIB_CLOUD_HOME"] = str(tmp_path / "home")
    if case == "setting":  # provider ssh without hosts
        env["JOBLIB_CLOUD_PROVIDER"] = "ssh"
        args, code, says = ["status"], 2, "provider 'ssh' needs hosts"
    elif case == "job":
        env["JOBLIB_CLOUD_PROVIDER"] = "local"
        args, code, says = ["logs", "ffffffff"], 1, "no job 'ffffffff'"
    else:
        kwargs = fleet.kwargs(hosts=fleet.hosts[:1])
        env.update({"JOBLIB_CLOUD_PROVIDER": "ssh", "JOBLIB_CLOUD_CONNECT_TIMEOUT": "2",
                    "JOBLIB_CLOUD_HOSTS": f"{fleet.hosts[0].user}@127.0.0.1:{_dead_port()}",
                    "JOBLIB_CLOUD_SSH_KEY": kwargs["ssh_key"],
                    "JOBLIB_CLOUD_KNOWN_HOSTS": kwargs["known_hosts"]})
        args, code, says = ["run", "--", "true"], 3, "127.0.0.1"
    done = subprocess.run([sys.executable, "-m", "joblib_cloud", *args], env=env,
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == code, done.stderr
    assert len(lines) == 1 and lines[0].startswith("joblib-cloud: error: "), done.stderr
    assert says in lines[0] and "Traceback" not in done.stderr
    assert f"\n  {code}    " in cli.build_parser().format_help()  # documented
