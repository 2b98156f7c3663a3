"""The Python stage for real over SSH: venvs on lab hosts h9 (CPU) and h10 (a simulated
H100), torch and the locks from the lab's package index.

What is checked: a venv that reuses the system Python's torch (venv_system_site_packages,
as on the H100 host) gets the lock and is verified against that torch; a host whose torch
does not match the resolver's plan fails clearly while the other host finishes; a rerun
changes nothing; a changed pin is applied on the next run; a Python the lock has no
wheels for fails with the fix; bad settings stop the run before any host is touched.
The first run of a venv that installs torch 2.13.0+cpu itself is test_deploy_lab's. (The conda backend cannot run here: no conda installer or
channel can be reached; tests/test_pyenv_specs.py checks its commands.)
"""

import runpy
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from lab import pyindex
from lab.lab import LAB, PORTS
from lab.rootfs import cache_dir
from operations.pyplan import lock_path, read_lock
from tests.test_deploy_lab import totals

INDEX = f"http://127.0.0.1:{PORTS['www']}/pypi/simple/"
CPU_LOCK = lock_path("chatglm-cpu")
# torch and what `import torch` needs, put into the host's system Python (as the H100
# host has torch in its system Python 3.12).
SYSTEM_TORCH = ["torch==2.13.0+cpu"] + [
    f"{name}=={version}" for name, version in read_lock(CPU_LOCK)["pins"].items()
    if name in ("filelock", "typing-extensions", "sympy", "mpmath", "networkx", "jinja2",
                "markupsafe", "fsspec", "numpy")]
INSTALL_SYSTEM_TORCH = (
    "DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends python3-venv "
    ">/dev/null && python3 -m venv /tmp/bootstrap && /tmp/bootstrap/bin/pip install -q --no-deps "
    f"--index-url {INDEX} --target /usr/local/lib/python3.11/dist-packages " + " ".join(SYSTEM_TORCH))
IN_ENV = "{env}/bin/python -c 'import importlib.metadata as m, torch; print(torch.__version__, " \
         "m.version(\"idna\"), torch.__file__)'"


def inventory(lab, tmp_path: Path, name: str, hosts: dict) -> Path:
    """An inventory of some lab hosts with their data changed: {host: {setting: value}}."""
    entries = dict(runpy.run_path(str(lab.inventory))["lab"])
    lines = ["lab = ["]
    for host, data in hosts.items():
        merged = {**entries[host], "report_dir": str(tmp_path / "reports"), **data}
        lines.append(f"    ({host!r}, {merged!r}),")
    path = tmp_path / f"{name}.py"
    path.write_text("\n".join(lines + ["]", ""]))
    return path


def test_venv_pins_changes_and_checks(lab, tmp_path):
    # The lab's index gets a second idna release, for a pin that changes between runs.
    wheels = cache_dir() / "wheels"
    extra = tmp_path / "extra.txt"
    extra.write_text("idna==3.10\n")
    pyindex.fill(str(extra), str(wheels))
    pyindex.write_index(str(wheels), str(LAB / "www" / "pypi"))
    # torch in the system Python of both hosts, as the H100 host has it. (The first run of
    # a venv that installs torch itself is test_deploy_lab's, on h1 and h2.)
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(lambda h: lab.ssh(h, INSTALL_SYSTEM_TORCH), ("h9", "h10")))

    # 1. The system Python's torch reused through --system-site-packages on h9 (CPU); on h10,
    # planned for CUDA 13.0 (an H100), the same CPU torch fails verify while h9 finishes.
    no_torch = tmp_path / "no-torch.txt"
    no_torch.write_text("".join(line + "\n" for line in CPU_LOCK.read_text().splitlines()
                                if not line.startswith("torch==")))
    system = {"requirements": str(no_torch), "venv_system_site_packages": True}
    both = lab.deploy(inventory=inventory(lab, tmp_path, "system", {"h9": system, "h10": system}))
    assert both.returncode != 0, both.stdout[-5000:]
    assert "[h10]" in both.stdout and "torch 2.13.0+cpu is built for CPU only, but the resolver " \
        "planned CUDA 13.0 (cu130)" in both.stdout, both.stdout[-5000:]
    assert not [line for line in both.stdout.splitlines() if "[h9]" in line and "ERROR" in line]
    out = lab.ssh("h9", IN_ENV.format(env="/opt/chatglm/venv")).stdout.split()
    assert out[:2] == ["2.13.0+cpu", "3.20"], out
    assert out[2].startswith("/usr/local/lib/python3.11/dist-packages/torch/"), out
    assert "include-system-site-packages = true" in lab.ssh("h9", "cat /opt/chatglm/venv/pyvenv.cfg").stdout
    assert f"index-url = {INDEX}" in lab.ssh("h9", "cat /opt/chatglm/venv/pip.conf").stdout
    lock = lab.ssh("h9", "cat /opt/chatglm/requirements.lock").stdout
    assert "transformers==4.33.3" in lock and "\ntorch==" not in lock
    assert lab.ssh("h9", "/opt/chatglm/venv/bin/pip list 2>/dev/null | grep -c '^transformers '").stdout.strip() == "1"

    system_inv = inventory(lab, tmp_path, "system-h9", {"h9": system})
    again = lab.deploy(inventory=system_inv)
    assert again.returncode == 0 and totals(again.stdout)["success"] == 0, again.stdout[-3000:]

    # 2. A changed pin is applied on the next run, and a rerun after it changes nothing.
    changed_lock = tmp_path / "changed.txt"
    changed_lock.write_text(no_torch.read_text().replace("idna==3.20", "idna==3.10"))
    changed_inv = inventory(lab, tmp_path, "changed", {"h9": {**system, "requirements": str(changed_lock)}})
    changed = lab.deploy(inventory=changed_inv)
    assert changed.returncode == 0, changed.stdout[-5000:]
    assert lab.ssh("h9", IN_ENV.format(env="/opt/chatglm/venv")).stdout.split()[:2] == \
        ["2.13.0+cpu", "3.10"]
    rerun = lab.deploy(inventory=changed_inv)
    assert rerun.returncode == 0 and totals(rerun.stdout)["success"] == 0, rerun.stdout[-3000:]

    # 3. A lock for another Python fails the host, with the way out; nothing is made.
    py312 = lab.deploy(inventory=inventory(lab, tmp_path, "py312", {"h9": {
        "install_dir": "/opt/chatglm-312", "requirements": "chatglm-py312-system-torch",
        # The lab's index holds the CPU lock's wheels only: the check before the run would
        # stop at that (tests/test_preflight.py); this case is the host's own Python.
        "venv_system_site_packages": True, "check_sources": False}}))
    assert py312.returncode != 0
    assert "python3 is Python 3.11, but the lock 'chatglm-py312-system-torch' has wheels for " \
        "Python 3.12 only; Fix: set python to a Python 3.12 interpreter" in py312.stdout, py312.stdout[-3000:]
    assert lab.ssh("h9", "ls /opt/chatglm-312/venv", check=False).returncode != 0

    # 4. Bad mirror settings stop the run before any host is touched.
    bad = lab.deploy(inventory=inventory(lab, tmp_path, "bad", {"h9": {
        "install_dir": "/opt/chatglm-bad", "pip_index_url": "https://pypi.tuna.tsinghua.edu.cn"}}))
    assert bad.returncode != 0
    assert "host 'h9': setting 'pip_index_url'" in bad.stdout and "Fix:" in bad.stdout
    assert lab.ssh("h9", "ls /opt/chatglm-bad", check=False).returncode != 0
