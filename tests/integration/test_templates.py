"""Root file system templates registered by the operator (a directory holding usr/ and etc/)."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from tests.conftest import Server, make_data_dir

pytestmark = pytest.mark.sandbox


def test_a_registered_template_is_the_sandboxs_root() -> None:
    data_dir = make_data_dir("corral-test-templates-")
    template = data_dir / "templates" / "marked"
    template.mkdir(parents=True)
    # A template of the host's own /usr, as hard links (fast, no copy), plus its own marker
    # and an /etc of its own.
    subprocess.run(["cp", "-al", "/usr", str(template / "usr")], check=True)
    (template / "usr" / "share" / "corral-template-marker").write_text("marked\n")
    (template / "etc").mkdir()
    (template / "etc" / "motd").write_text("from the template\n")
    srv = Server(data_dir)
    srv.start()
    try:
        with srv.client() as api:
            assert api.get("/v1/templates").json() == ["host", "marked"]
            sid = api.post("/v1/sandboxes", json={"template": "marked"}).json()["id"]
            plain = api.post("/v1/sandboxes", json={}).json()["id"]
            probe = {"command": "cat /usr/share/corral-template-marker /etc/motd"}
            result = api.post(f"/v1/sandboxes/{sid}/exec", json=probe).json()
            assert result["stdout"] == "marked\nfrom the template\n"
            assert api.get(f"/v1/sandboxes/{sid}").json()["template"] == "marked"
            other = api.post(f"/v1/sandboxes/{plain}/exec", json=probe).json()
            assert other["exit_code"] != 0
            # Both supervisors run on the host's interpreter (from its read-only /usr, not the
            # template's), from the code the node compiled with it.
            scripts = {"command": "pgrep -a -f /.corral/supervisor | grep -v bwrap"}
            for box in (plain, sid):
                listed = api.post(f"/v1/sandboxes/{box}/exec", json=scripts).json()["stdout"]
                lines = listed.splitlines()
                assert len(lines) == 2, listed  # the supervisor and its launcher
                assert all("/.corral/host/usr/bin/python3" in line for line in lines), listed
                assert all(" -I -S /.corral/supervisor.pyc " in line for line in lines), listed
            unknown = api.post("/v1/sandboxes", json={"template": "nope"})
            assert unknown.status_code == 409 and "marked" in unknown.json()["error"]["message"]
    finally:
        srv.stop()
        shutil.rmtree(data_dir, ignore_errors=True)
