"""The GPU stack for real in lab hosts that simulate an H100 (sysfs PCI id, a loaded
module's /proc/driver/nvidia/version, efivars), against the NVIDIA-shaped apt repo."""

from concurrent.futures import ThreadPoolExecutor

from lab.lab import PORTS
from tests.test_deploy_lab import totals

GPU_HOSTS = ("h4", "h5", "h6", "h7", "h8")
LOOKUP_VENV = ("apt-get install -y -qq python3-venv curl >/dev/null && python3 -m venv /opt/lookup && "
               f"/opt/lookup/bin/pip install -q --index-url http://127.0.0.1:{PORTS['www']}/pypi/simple/ "
               "cpm_kernels==1.0.11 setuptools==80.10.2")
CPM_LOOKUP = ("/opt/lookup/bin/python -c \"import importlib.util as u, os, json; "
              "s = u.find_spec('cpm_kernels'); "
              "b = os.path.join(s.submodule_search_locations[0], 'library', 'base.py'); "
              "m = u.module_from_spec(u.spec_from_file_location('b', b)); m.__spec__.loader.exec_module(m); "
              "print(json.dumps({n: m.unix_find_lib(n) for n in ('cuda', 'cudart', 'cublasLt', 'nvrtc')}))\"")


def limit(*hosts):
    return [arg for h in hosts for arg in ("--limit", h)]


def test_gpu_stack_scenarios(lab):
    # Each host brings a Python with cpm_kernels, as the H100 host brings its own.
    with ThreadPoolExecutor(len(GPU_HOSTS)) as pool:
        list(pool.map(lambda h: lab.ssh(h, LOOKUP_VENV), GPU_HOSTS))

    # h6 reproduces the seed's failure: the driver's libraries live outside the ld.so
    # cache (as under /usr/local/nvidia/lib64 in GPU containers), so cpm_kernels' lookup
    # finds no libcuda at all.
    repo = f"http://127.0.0.1:{PORTS['www']}/compute/cuda/repos/debian12/x86_64"
    lab.ssh("h6", f"curl -fsSO {repo}/cuda-keyring_1.1-1_all.deb && dpkg -i cuda-keyring_1.1-1_all.deb "
                  ">/dev/null && apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install "
                  "-y -qq nvidia-driver-580 >/dev/null 2>&1 && mkdir -p /usr/local/nvidia/lib64 && "
                  "mv /usr/lib/x86_64-linux-gnu/libcuda.so* /usr/local/nvidia/lib64/ && ldconfig")
    before = lab.ssh("h6", CPM_LOOKUP).stdout
    assert '"cuda": null' in before, before

    run = lab.deploy(*limit(*GPU_HOSTS))
    out = run.stdout
    assert run.returncode != 0  # h5 and h8 must fail ...
    # ... with the exact fix, while the other hosts finish.
    assert "[h5]" in out and "Driver/library version mismatch" in out and "580.95.05" in out
    assert "reboot the host" in out
    assert "Secure Boot is enabled" in out and "enroll a Machine Owner Key" in out
    assert lab.ssh("h8", "dpkg -l 'nvidia-driver-*' 2>/dev/null | grep -c ^ii", check=False).stdout.strip() in ("", "0")

    # h4: resolved to CUDA 13.0 / branch 580 / cuDNN 9 for CUDA 13 on Debian 12, held.
    held = lab.ssh("h4", "apt-mark showhold").stdout.split()
    assert {"cuda-drivers-580", "nvidia-driver-580", "cuda-toolkit-13-0", "libcudnn9-cuda-13"} <= set(held)
    assert lab.ssh("h4", "readlink -f /usr/local/cuda").stdout.strip() == "/usr/local/cuda-13.0"
    assert lab.ssh("h4", "cat /etc/modprobe.d/blacklist-nouveau.conf").stdout.count("nouveau") >= 2
    after = lab.ssh("h4", CPM_LOOKUP).stdout
    for name in ("cuda", "cudart", "cublasLt", "nvrtc"):
        assert f'"{name}": "/usr/local/cuda/lib64/lib{name}.so"' in after, after
    assert lab.ssh("h4", "readlink /usr/local/cuda/lib64/libcuda.so").stdout.strip() == \
        "/usr/lib/x86_64-linux-gnu/libcuda.so.580.95.05"

    # h6: the installed 580 driver satisfies CUDA 13.0, so it is kept (no cuda-drivers
    # package pulled in), and libcuda is linked from where it really is: cured.
    assert lab.ssh("h6", "dpkg -l cuda-drivers-580 2>/dev/null | grep -c ^ii", check=False).stdout.strip() in ("", "0")
    assert lab.ssh("h6", "readlink /usr/local/cuda/lib64/libcuda.so").stdout.strip() == \
        "/usr/local/nvidia/lib64/libcuda.so.580.95.05"
    assert '"cuda": "/usr/local/cuda/lib64/libcuda.so"' in lab.ssh("h6", CPM_LOOKUP).stdout

    # h7: the pins win: branch 570, CUDA 12.8, and nothing newer slipped in.
    versions = lab.ssh("h7", "dpkg-query -W -f '${Package}=${Version}\\n' 'nvidia-driver-*' "
                             "'cuda-toolkit-*' 2>/dev/null").stdout
    assert "nvidia-driver-570=570.195.03-1" in versions and "cuda-toolkit-12-8=" in versions
    assert "nvidia-driver-580" not in versions and "cuda-toolkit-13-0" not in versions
    assert lab.ssh("h7", "readlink -f /usr/local/cuda").stdout.strip() == "/usr/local/cuda-12.8"

    # The hosts that succeeded converge: a rerun changes nothing.
    again = lab.deploy(*limit("h4", "h6", "h7"))
    assert again.returncode == 0, again.stdout[-3000:]
    t = totals(again.stdout)
    assert t["success"] == 0 and t["error"] == 0, again.stdout[-3000:]
