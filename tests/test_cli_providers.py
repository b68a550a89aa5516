"""``up``, ``status`` and ``down`` for the providers that run here, as a user types them:
the provider comes from the configuration, and each answers sensibly (for ``ssh``,
status is whether each host answers SSH with the right key)."""

from __future__ import annotations

import socket

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
