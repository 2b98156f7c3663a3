"""`python -m lab.local`: the lab's stand-ins alone on this machine, as
tools/h100_full_deploy.sh starts them on the H100 host, each probed by its protocol."""

import json
import os
import subprocess
import sys
import urllib.request
import zipfile
from pathlib import Path

import pytest

from lab import local

ROOT = Path(__file__).resolve().parent.parent


def test_data_values_parse_as_json_when_they_can():
    assert local.parse_data(["a=true", "b=24", "c=/usr/bin/python3", "d={\"x\": 1}", "e=x=y"]) == {
        "a": True, "b": 24, "c": "/usr/bin/python3", "d": {"x": 1}, "e": "x=y"}
    with pytest.raises(SystemExit):
        local.parse_data(["novalue"])


def _wheel(directory: Path) -> Path:
    path = directory / "demo_pkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("demo_pkg-1.0.dist-info/METADATA",
                    "Metadata-Version: 2.1\nName: demo-pkg\nVersion: 1.0\nRequires-Python: >=3.8\n\n")
        zf.writestr("demo_pkg/__init__.py", "")
    return path


def _get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read()


def test_local_up_serves_every_upstream_for_an_at_local_inventory_then_down(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("the stand-ins are started as the lab starts them: as root")
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    _wheel(wheels)
    # Its own state folder and ports, beside any lab already running.
    env = {**os.environ, "CHATGLM_LAB_DIR": str(tmp_path / "lab"),
           "CHATGLM_LAB_PORT_OFFSET": str(int(os.environ.get("CHATGLM_LAB_PORT_OFFSET", "0")) + 57)}
    cmd = [sys.executable, "-m", "lab.local"]
    up = subprocess.run([*cmd, "up", "--wheels", str(wheels), "--data", "venv_system_site_packages=true",
                         "--data", "python=/usr/bin/python3"], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=600)
    try:
        assert up.returncode == 0, up.stdout[-3000:] + up.stderr[-3000:]
        inventory = Path(up.stdout.strip().splitlines()[-1])
        assert inventory == tmp_path / "lab" / "local-inventory.py"
        scope: dict = {}
        exec(inventory.read_text(), scope)
        [(name, data)] = scope["local"]
        assert name == "@local"
        assert data["venv_system_site_packages"] is True and data["python"] == "/usr/bin/python3"
        assert data["python_backend"] == "venv"  # no conda installer or channel on loopback

        heads = subprocess.run(["git", "ls-remote", data["code_url"]], capture_output=True, text=True,
                               timeout=30).stdout
        assert data["code_revision"] in heads
        for variant, commit in data["model_revisions"].items():
            url = data["model_url"].format(name={"fp16": "chatglm-6b"}.get(variant, f"chatglm-6b-{variant}"))
            assert commit in subprocess.run(["git", "ls-remote", url], capture_output=True,
                                            text=True, timeout=30).stdout
        listing = json.loads(_get(f"{data['seafile_url']}/api/v2.1/share-links/fb9f16d6dc8f482596c2/dirents/?path=/"))
        assert "pytorch_model-00001-of-00002.bin" in [d.get("file_name") for d in listing["dirent_list"]]
        page = _get(data["pip_index_url"] + "demo-pkg/").decode()
        assert "demo_pkg-1.0-py3-none-any.whl" in page and 'data-requires-python="&gt;=3.8"' in page
        state = json.loads((tmp_path / "lab" / "state.json").read_text())
        pids = [s["pid"] for s in state["services"].values()]
        assert sorted(state["services"]) == ["git", "seafile", "www"] and not state["hosts"]
    finally:
        down = subprocess.run([*cmd, "down"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert down.returncode == 0, down.stderr
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text().lower()
