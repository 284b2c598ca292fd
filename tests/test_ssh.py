"""tools/ssh: argv builders, the remote script's quoting and grammar checks, marker parsing."""

from __future__ import annotations

import dataclasses
import re
import shlex
import subprocess
from pathlib import Path
from typing import Any

import pytest

from pipeline.tools import ssh

DIGEST = "sha256:" + "ab" * 32
PASSWORD = "pa$$ 'word\"`x`"


def _conn(**changes: Any) -> ssh.Connection:
    values: dict[str, Any] = {
        "host": "10.0.0.5",
        "port": 2222,
        "user": "deployer",
        "key_file": Path("/tmp/p/id"),
        "known_hosts_file": Path("/tmp/p/known_hosts"),
        "control_path": Path("/tmp/p/cm"),
    }
    return ssh.Connection(**(values | changes))


def _plan(**changes: Any) -> ssh.RemotePlan:
    values: dict[str, Any] = {
        "deploy_dir": "/srv/app",
        "compose_command": ("docker", "compose"),
        "compose_file": None,
        "services": ("web", "api"),
        "workers": ("worker",),
        "repository": "nexus.example:8444/orchestrator-app",
        "tag": "main-a1b2c3d4",
        "digest": DIGEST,
        "env_vars": (("IMAGE_TAG", "main-a1b2c3d4"), ("IMAGE_DIGEST", DIGEST)),
        "rollback_file": ".env.rollback",
        "token": "0123456789abcdef",
        "owner": "runner-1 pid 42 https://gitlab.example/jobs/7",
        "lock_stale_seconds": 900,
        "lock_wait_seconds": 600,
        "registry_user": "svc-deployer",
        "registry_password": PASSWORD,
    }
    return ssh.RemotePlan(**(values | changes))


def _options(argv: list[str]) -> dict[str, str]:
    pairs = [argv[i + 1] for i, arg in enumerate(argv) if arg == "-o"]
    return dict(pair.split("=", 1) for pair in pairs)


# --- argv ------------------------------------------------------------------------------------


def test_master_authenticates_then_backgrounds_as_control_master() -> None:
    argv = ssh.master_argv(_conn())

    assert argv[:3] == ["ssh", "-F", "/dev/null"]
    assert argv[-3:] == ["-N", "-f", "deployer@10.0.0.5"]
    options = _options(argv)
    assert options["ControlMaster"] == "yes"
    assert options["ControlPersist"] == "900"
    assert options["ControlPath"] == "/tmp/p/cm"
    assert options["StrictHostKeyChecking"] == "yes"
    assert options["UserKnownHostsFile"] == "/tmp/p/known_hosts"
    assert options["GlobalKnownHostsFile"] == "/dev/null"
    assert options["BatchMode"] == "yes"
    assert options["IdentitiesOnly"] == "yes"
    assert ["-i", "/tmp/p/id"] == argv[argv.index("-i") : argv.index("-i") + 2]
    assert ["-p", "2222"] == argv[argv.index("-p") : argv.index("-p") + 2]


def test_sessions_reuse_the_master_and_read_the_script_from_stdin() -> None:
    argv = ssh.session_argv(_conn())

    assert _options(argv)["ControlMaster"] == "no"
    assert argv[-3:] == ["-T", "deployer@10.0.0.5", "sh -s"]


def test_exit_closes_the_master() -> None:
    argv = ssh.exit_argv(_conn())

    assert argv[-3:] == ["-O", "exit", "deployer@10.0.0.5"]
    assert _options(argv)["ControlPath"] == "/tmp/p/cm"


def test_trust_on_first_use_only_when_asked() -> None:
    assert (
        _options(ssh.master_argv(_conn(trust_on_first_use=True)))["StrictHostKeyChecking"]
        == "accept-new"
    )


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("host", "-oProxyCommand=x"),
        ("host", "a b"),
        ("user", "root;id"),
        ("user", "-l"),
        ("control_path", Path("/tmp/with space/cm")),
    ],
)
def test_connection_refuses_values_outside_their_grammar(field: str, value: object) -> None:
    with pytest.raises(ssh.InvalidValueError):
        _conn(**{field: value})


def test_keygen_checks_the_key_without_a_passphrase() -> None:
    assert ssh.keygen_public_argv(Path("/tmp/p/id")) == [
        "ssh-keygen",
        "-y",
        "-P",
        "",
        "-f",
        "/tmp/p/id",
    ]


# --- the remote script -----------------------------------------------------------------------


def test_values_are_quoted_assignments_at_the_top() -> None:
    script = ssh.remote_script(_plan(deploy_dir="/srv/app,1"), ssh.Phase.ALL)

    assert "DEPLOY_DIR=/srv/app,1\n" in script
    assert "SERVICES='web api'\n" in script
    assert f"IMAGE_REF=nexus.example:8444/orchestrator-app@{DIGEST}\n" in script
    assert "TAG_REF=nexus.example:8444/orchestrator-app:main-a1b2c3d4\n" in script
    assert "ENV_LINES() { printf '%s\\n' IMAGE_TAG=main-a1b2c3d4 IMAGE_DIGEST=" in script
    assert "OWNER='runner-1 pid 42 https://gitlab.example/jobs/7'\n" in script
    assert script.rstrip().endswith("main deploy_all")


def test_the_password_is_only_in_the_here_document() -> None:
    script = ssh.remote_script(_plan(), ssh.Phase.ALL)

    lines = script.splitlines()
    assert lines.count(PASSWORD) == 1
    at = lines.index(PASSWORD)
    assert lines[at - 1].endswith("<<'PIPELINE_SECRET_0123456789abcdef'")
    assert "--password-stdin" in lines[at - 1]
    assert 'DOCKER_CONFIG="$PULL_CONFIG" docker login' in lines[at - 1]
    assert lines[at + 1] == "PIPELINE_SECRET_0123456789abcdef"
    assert sum(PASSWORD in line for line in lines) == 1


def test_without_credentials_the_pull_is_anonymous() -> None:
    script = ssh.remote_script(_plan(registry_user=None, registry_password=None), ssh.Phase.UP)

    assert "docker login" not in script.split("registry_login() {", 1)[-1].split("}", 1)[0]
    assert "pulling anonymously" in script


def test_script_is_valid_posix_sh() -> None:
    for phase in ("deploy_all", "deploy_up", "deploy_finish", "deploy_rollback", "settle_healthy"):
        script = ssh.remote_script(_plan(), phase)
        done = subprocess.run(
            ["sh", "-n"], input=script, capture_output=True, text=True, check=False
        )
        assert done.returncode == 0, done.stderr


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("deploy_dir", "srv/app"),
        ("deploy_dir", "/srv/$(id)"),
        ("deploy_dir", "/srv/app'; rm -rf /'"),
        ("compose_file", "../etc/passwd"),
        ("compose_file", "a b.yml"),
        ("rollback_file", "x/../../y"),
        ("services", ("web", "a;b")),
        ("workers", ("-f",)),
        ("tag", "main a"),
        ("tag", "-x"),
        ("digest", "sha256:abc"),
        ("digest", "sha512:" + "a" * 128),
        ("repository", "Nexus/App"),
        ("repository", "nexus:8444/app;id"),
        ("env_vars", (("IMAGE-TAG", "x"),)),
        ("compose_command", ("docker", "compose;id")),
        ("token", "XYZ"),
        ("owner", "a\nb"),
        ("registry_user", "a b"),
        ("registry_password", "two\nlines"),
        ("registry_password", ""),
    ],
)
def test_values_outside_their_grammar_never_reach_a_shell(field: str, value: object) -> None:
    with pytest.raises(ssh.InvalidValueError):
        _plan(**{field: value})


def test_health_url_grammar() -> None:
    ssh.Health(url="http://127.0.0.1:8080/health?full=1", tries=1, interval=0.1, timeout=1)
    for url in ("ftp://x/", "http://x/$(id)", "http://x/a b", "http://x/'"):
        with pytest.raises(ssh.InvalidValueError):
            ssh.Health(url=url, tries=1, interval=0.1, timeout=1)


def test_unknown_phase_is_refused() -> None:
    with pytest.raises(ssh.InvalidValueError):
        ssh.remote_script(_plan(), "rm -rf /")


def test_every_quoted_value_round_trips_through_shlex() -> None:
    plan = _plan(owner="host pid 1 job=a,b:c/d@e+f")
    script = ssh.remote_script(plan, ssh.Phase.ALL)

    [line] = [line for line in script.splitlines() if line.startswith("OWNER=")]
    assert shlex.split(line.removeprefix("OWNER=")) == [plan.owner]


def test_plan_refs() -> None:
    plan = _plan()

    assert plan.registry == "nexus.example:8444"
    assert plan.image_ref == f"nexus.example:8444/orchestrator-app@{DIGEST}"
    assert plan.tag_ref == "nexus.example:8444/orchestrator-app:main-a1b2c3d4"
    assert "registry_password" not in repr(plan)
    assert dataclasses.replace(plan, tag="x").tag == "x"


# --- markers ---------------------------------------------------------------------------------


def test_parse_markers_keeps_order_and_ignores_other_lines() -> None:
    stdout = (
        "@deploy lock begin /srv/app/.deploy.lock\n"
        "Creating app_web_1 ... done\n"
        "@deploy lock ok taken after 0s\n"
        "@deploy health fail no HTTP 200 after 3 tries (last: 404)\r\n"
        "@deploy unlock ok \n"
        "@deploy nonsense maybe\n"
    )

    markers = ssh.parse_markers(stdout)

    assert [(m.step, m.status) for m in markers] == [
        ("lock", "begin"),
        ("lock", "ok"),
        ("health", "fail"),
        ("unlock", "ok"),
    ]
    assert markers[2].text == "no HTTP 200 after 3 tries (last: 404)"
    assert ssh.last_step(markers) == "health"
    assert ssh.last_step([]) is None


def test_remote_exit_codes_are_distinct_and_outside_sh_own() -> None:
    codes = [int(code) for code in ssh.RemoteExit]
    assert len(codes) == len(set(codes))
    assert all(code == 0 or code >= 64 for code in codes)
    assert re.fullmatch(r"sh -s", ssh.REMOTE_COMMAND)
