"""The Python stage for real over SSH: venvs on lab hosts h9 (CPU) and h10 (a simulated
H100), torch and the locks from the lab's package index.

What is checked: the first run installs torch 2.13.0+cpu and the lock, a rerun changes
nothing, a changed pin is applied on the next run, a venv that reuses the system
Python's torch (venv_system_site_packages) is verified against that torch, a host whose
torch does not match the resolver's plan fails clearly while the other host finishes, a
Python the lock has no wheels for fails with the fix, and bad settings stop the run
before any host is touched. (The conda backend cannot run here: no conda installer or
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


def python_ops_changed(output: str) -> list[str]:
    return [line for line in output.splitlines() if "Python:" in line and "Success" in line]


def test_venv_pins_changes_and_checks(lab, tmp_path):
    # The lab's index gets a second idna release, for a pin that changes between runs.
    wheels = cache_dir() / "wheels"
    extra = tmp_path / "extra.txt"
    extra.write_text("idna==3.10\n")
    pyindex.fill(str(extra), str(wheels))
    pyindex.write_index(str(wheels), str(LAB / "www" / "pypi"))
    # torch into the system Python of h10 (for step 3) while steps 1 and 2 run on h9.
    pool = ThreadPoolExecutor(1)
    h10_torch = pool.submit(lab.ssh, "h10", INSTALL_SYSTEM_TORCH)

    # 1. First run: venv, torch 2.13.0+cpu from the index, the lock; verify passes.
    first_inv = inventory(lab, tmp_path, "first", {"h9": {}})
    first = lab.deploy(inventory=first_inv)
    assert first.returncode == 0, first.stdout[-5000:]
    out = lab.ssh("h9", IN_ENV.format(env="/opt/chatglm/venv")).stdout.split()
    assert out[:2] == ["2.13.0+cpu", "3.20"] and out[2].startswith("/opt/chatglm/venv/"), out
    assert f"index-url = {INDEX}" in lab.ssh("h9", "cat /opt/chatglm/venv/pip.conf").stdout
    lock = lab.ssh("h9", "cat /opt/chatglm/requirements.lock").stdout
    assert "transformers==4.33.3" in lock and "\ntorch==" not in lock

    again = lab.deploy(inventory=first_inv)
    assert again.returncode == 0 and totals(again.stdout)["success"] == 0, again.stdout[-3000:]

    # 2. A changed pin is applied on the next run, and only that.
    changed_lock = tmp_path / "changed.txt"
    changed_lock.write_text(CPU_LOCK.read_text().replace("idna==3.20", "idna==3.10"))
    changed_inv = inventory(lab, tmp_path, "changed", {"h9": {"requirements": str(changed_lock)}})
    changed = lab.deploy(inventory=changed_inv)
    assert changed.returncode == 0, changed.stdout[-5000:]
    assert lab.ssh("h9", IN_ENV.format(env="/opt/chatglm/venv")).stdout.split()[:2] == \
        ["2.13.0+cpu", "3.10"]
    rerun = lab.deploy(inventory=changed_inv)
    assert rerun.returncode == 0 and totals(rerun.stdout)["success"] == 0, rerun.stdout[-3000:]

    # 3. The system Python's torch reused through --system-site-packages (h9), and on h10,
    # planned for CUDA 13.0 (an H100), the same CPU torch fails verify; h9 still finishes.
    lab.ssh("h9", INSTALL_SYSTEM_TORCH)
    h10_torch.result()
    pool.shutdown()
    no_torch = tmp_path / "no-torch.txt"
    no_torch.write_text("".join(line + "\n" for line in CPU_LOCK.read_text().splitlines()
                                if not line.startswith("torch==")))
    system = {"install_dir": "/opt/chatglm-sys", "requirements": str(no_torch),
              "venv_system_site_packages": True}
    both = lab.deploy(inventory=inventory(lab, tmp_path, "system", {"h9": system, "h10": system}))
    assert both.returncode != 0, both.stdout[-5000:]
    out = lab.ssh("h9", IN_ENV.format(env="/opt/chatglm-sys/venv")).stdout.split()
    assert out[0] == "2.13.0+cpu" and out[2].startswith("/usr/local/lib/python3.11/dist-packages/"), out
    assert "include-system-site-packages = true" in lab.ssh("h9", "cat /opt/chatglm-sys/venv/pyvenv.cfg").stdout
    assert lab.ssh("h9", "ls /opt/chatglm-sys/venv/lib/python3.11/site-packages | grep -c '^torch'",
                   check=False).stdout.strip() == "0"
    assert "[h10]" in both.stdout and "torch 2.13.0+cpu is built for CPU only, but the resolver " \
        "planned CUDA 13.0 (cu130)" in both.stdout, both.stdout[-5000:]
    assert "[h9] " not in "".join(l for l in both.stdout.splitlines() if "ERROR:" in l)

    # 4. A lock for another Python fails the host, with the way out.
    py312 = lab.deploy(inventory=inventory(lab, tmp_path, "py312", {"h9": {
        "install_dir": "/opt/chatglm-312", "requirements": "chatglm-py312-system-torch",
        "venv_system_site_packages": True}}))
    assert py312.returncode != 0
    assert "python3 is Python 3.11, but the lock 'chatglm-py312-system-torch' has wheels for " \
        "Python 3.12 only; Fix: set python to a Python 3.12 interpreter" in py312.stdout, py312.stdout[-3000:]
    assert lab.ssh("h9", "ls /opt/chatglm-312/venv", check=False).returncode != 0

    # 5. Bad mirror settings stop the run before any host is touched.
    bad = lab.deploy(inventory=inventory(lab, tmp_path, "bad", {"h9": {
        "install_dir": "/opt/chatglm-bad", "pip_index_url": "https://pypi.tuna.tsinghua.edu.cn"}}))
    assert bad.returncode != 0
    assert "host 'h9': setting 'pip_index_url'" in bad.stdout and "Fix:" in bad.stdout
    assert lab.ssh("h9", "ls /opt/chatglm-bad", check=False).returncode != 0
