"""A sandbox's own root: `sudo` (user root) is uid 0 of the sandbox's user namespace only, and
packages installed into the sandbox stay in it."""

from __future__ import annotations

import os

import httpx
import pytest

pytestmark = pytest.mark.sandbox

# A minimal wheel, built inside the sandbox by the test itself: no registry involved.
MAKE_WHEEL = r"""
import zipfile, hashlib, base64
name, version = "corral_probe_pkg", "1.0"
files = {
    f"{name}/__init__.py": b"ANSWER = 42\n",
    f"{name}-{version}.dist-info/METADATA":
        b"Metadata-Version: 2.1\nName: corral-probe-pkg\nVersion: 1.0\n",
    f"{name}-{version}.dist-info/WHEEL":
        b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
}
record = []
for path, data in files.items():
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    record.append(f"{path},sha256={digest},{len(data)}")
record.append(f"{name}-{version}.dist-info/RECORD,,")
files[f"{name}-{version}.dist-info/RECORD"] = ("\n".join(record) + "\n").encode()
with zipfile.ZipFile(f"/workspace/{name}-{version}-py3-none-any.whl", "w") as wheel:
    for path, data in files.items():
        wheel.writestr(path, data)
"""
WHEEL = "/workspace/corral_probe_pkg-1.0-py3-none-any.whl"
IMPORT = "python3 -c 'import corral_probe_pkg; print(corral_probe_pkg.ANSWER)'"


def run(api: httpx.Client, sid: str, command: str, **extra: object) -> dict:
    resp = api.post(f"/v1/sandboxes/{sid}/exec", json={"command": command, **extra})
    assert resp.status_code == 200, resp.text
    return resp.json()


def test_sudo_is_root_inside_only(api: httpx.Client, sandbox_id: str) -> None:
    result = run(api, sandbox_id, "id -u; ls -A /root; cat /etc/shadow", user="root")
    assert result["stdout"].splitlines()[0] == "0"
    assert "/etc/shadow" in result["stderr"] and result["exit_code"] != 0
    status = run(api, sandbox_id, "grep -E 'CapEff|NoNewPrivs' /proc/self/status", user="root")
    assert "NoNewPrivs:\t1" in status["stdout"]
    # Root's files are its own host uid's, not host root's; the user cannot write /usr/local.
    assert run(api, sandbox_id, "touch /usr/local/mine")["exit_code"] != 0
    assert run(api, sandbox_id, "touch /usr/local/mine", user="root")["exit_code"] == 0
    # Root inside may change its own copy of /usr, never the host's; it cannot mount.
    marker = f"/usr/bin/corral-root-{sandbox_id}"
    assert run(api, sandbox_id, f"touch {marker}", user="root")["exit_code"] == 0
    assert not os.path.lexists(marker)
    assert run(api, sandbox_id, "touch /usr/bin/x")["exit_code"] != 0  # the user cannot
    for probe in ("mount -t tmpfs none /mnt", "unshare -U true"):
        assert run(api, sandbox_id, probe, user="root")["exit_code"] != 0, probe
    # The ordinary user has no capabilities at all.
    caps = run(api, sandbox_id, "grep -E '^Cap(Eff|Prm|Amb)' /proc/self/status")["stdout"]
    assert all(line.endswith("0000000000000000") for line in caps.splitlines())


def test_sudo_is_like_sudo_and_root_can_add_users(api: httpx.Client, sandbox_id: str) -> None:
    env = run(api, sandbox_id, "echo $HOME $USER $SUDO_USER $SUDO_UID; touch ~/.profile",
              user="root")  # fmt: skip
    assert (env["exit_code"], env["stdout"]) == (0, "/root root user 1000\n"), env
    assert run(api, sandbox_id, "echo $HOME $USER")["stdout"] == "/workspace user\n"
    added = run(
        api, sandbox_id,
        "groupadd team && useradd -m -G team alice && su alice -c 'touch ~/x; id -nG' && "
        "stat -c '%U %G' /home/alice/x",
        user="root",
    )  # fmt: skip
    assert added["exit_code"] == 0, added["stderr"]
    assert added["stdout"].split("\n")[:2] == ["alice team", "alice alice"], added
    # The ordinary user cannot write root's home or /home.
    assert run(api, sandbox_id, "touch /root/x || touch /home/x")["exit_code"] != 0


def test_a_command_runs_as_another_user_by_name(api: httpx.Client, sandbox_id: str) -> None:
    """`user: NAME` is `sudo -u NAME`: that user's uid, groups and home, no capabilities."""
    made = run(api, sandbox_id, "groupadd -f crew && (id bob || useradd -m -G crew bob)",
               user="root")  # fmt: skip
    assert made["exit_code"] == 0, made["stderr"]
    bob = run(api, sandbox_id, "echo $(id -un) $(id -nG) $HOME $USER $SUDO_USER; "
              "grep -E '^Cap(Eff|Prm|Bnd)' /proc/self/status", user="bob")  # fmt: skip
    lines = bob["stdout"].splitlines()
    assert lines[0] == "bob bob crew /home/bob bob user", bob
    assert all(line.endswith("0000000000000000") for line in lines[1:]), lines
    # Its environment still wins; one it sets keeps its HOME.
    resp = api.post(
        f"/v1/sandboxes/{sandbox_id}/exec",
        json={"command": "echo $HOME", "user": "bob", "env": {"HOME": "/tmp"}},
    )
    assert resp.json()["stdout"] == "/tmp\n"
    # A user the sandbox does not have cannot start; a name that is no user name is 422.
    missing = run(api, sandbox_id, "true", user="nobody-here")
    assert missing["status"] == "failed" and "nobody-here" in missing["error"], missing
    bad = api.post(f"/v1/sandboxes/{sandbox_id}/exec", json={"command": "true", "user": "Bad Name"})
    assert bad.status_code == 422, bad.text


def test_pip_install_stays_in_its_sandbox(api: httpx.Client, sandbox_id: str) -> None:
    assert run(api, sandbox_id, "python3 -", stdin=MAKE_WHEEL)["exit_code"] == 0
    install = run(
        api, sandbox_id,
        f"python3 -m pip install --no-index --break-system-packages {WHEEL}",
        user="root",
    )  # fmt: skip
    assert install["exit_code"] == 0, install["stderr"]
    assert run(api, sandbox_id, IMPORT)["stdout"] == "42\n"
    assert (
        "/usr/local/lib"
        in run(api, sandbox_id, "python3 -c 'import corral_probe_pkg as p; print(p.__file__)'")[
            "stdout"
        ]
    )
    other = api.post("/v1/sandboxes", json={}).json()["id"]
    try:
        assert run(api, other, IMPORT)["exit_code"] != 0
    finally:
        api.delete(f"/v1/sandboxes/{other}")


def test_user_install_without_sudo(api: httpx.Client, sandbox_id: str) -> None:
    run(api, sandbox_id, "python3 -", stdin=MAKE_WHEEL)
    install = run(
        api, sandbox_id, f"python3 -m pip install --user --no-index --break-system-packages {WHEEL}"
    )
    assert install["exit_code"] == 0, install["stderr"]
    assert run(api, sandbox_id, IMPORT)["stdout"] == "42\n"


def test_etc_is_the_sandboxs_own(api: httpx.Client, sandbox_id: str) -> None:
    assert run(api, sandbox_id, "echo 10.9.9.9 mine >> /etc/hosts")["exit_code"] != 0
    edit = run(api, sandbox_id, "echo 10.9.9.9 mine >> /etc/hosts", user="root")
    assert edit["exit_code"] == 0
    assert run(api, sandbox_id, "getent hosts mine")["stdout"].split() == ["10.9.9.9", "mine"]
    # The host's certificates are still there, read-only.
    assert run(api, sandbox_id, "test -s /etc/ssl/certs/ca-certificates.crt")["exit_code"] == 0
    assert run(api, sandbox_id, "touch /etc/ssl/x", user="root")["exit_code"] != 0
    other = api.post("/v1/sandboxes", json={}).json()["id"]
    try:
        assert run(api, other, "getent hosts mine")["exit_code"] != 0
    finally:
        api.delete(f"/v1/sandboxes/{other}")
