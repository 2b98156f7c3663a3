"""lab.aptrepo: the imitation of NVIDIA's CUDA apt repository.

Everything runs in temporary directories: apt-get gets a private configuration (sources, state,
cache, keys) and the repository is served on 127.0.0.1 only, so this machine's apt is untouched.
"""

import ctypes
import gzip
import importlib.util
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lab import aptrepo

pytestmark = pytest.mark.skipif(
    not all(shutil.which(t) for t in ("dpkg-deb", "gpg", "gpgv", "apt-get", "gcc")),
    reason="needs dpkg-deb, gpg, gpgv, apt-get and gcc")

NO_DRIVER = ("NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver. "
             "Make sure that the latest NVIDIA driver is installed and running.")
H100 = {"name": "NVIDIA H100 80GB HBM3", "memory_mib": 81559, "compute_cap": "9.0", "pci": "00000000:01:00.0"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(*cmd, check=True, **kw):
    return subprocess.run([str(c) for c in cmd], check=check, capture_output=True, text=True, **kw)


def _packages(repo, distro):
    """Packages index as {name: {version: fields}}."""
    text = (Path(repo["distros"][distro]["dir"]) / "Packages").read_text()
    index = {}
    for stanza in text.strip().split("\n\n"):
        fields = dict(line.split(": ", 1) for line in stanza.splitlines() if not line.startswith(" "))
        index.setdefault(fields["Package"], {})[fields["Version"]] = fields
    return index


def _deb(repo, distro, filename_prefix):
    [path] = Path(repo["distros"][distro]["dir"]).glob(filename_prefix + "_*.deb")
    return path


def _extract(deb, root):
    root.mkdir(parents=True, exist_ok=True)
    _run("dpkg-deb", "-x", deb, root)
    return root


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("aptrepo")
    port = _free_port()
    started = time.monotonic()
    result = aptrepo.build_repo(tmp / "www", f"http://127.0.0.1:{port}/compute/cuda/repos")
    result.update(tmp=tmp, www=tmp / "www", port=port, wall=time.monotonic() - started)
    return result


@pytest.fixture(scope="module")
def server(repo):
    proc = subprocess.Popen([sys.executable, "-m", "http.server", "--bind", "127.0.0.1",
                             "--directory", str(repo["www"]), str(repo["port"])],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                socket.create_connection(("127.0.0.1", repo["port"]), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError("http.server did not start")
                time.sleep(0.1)
        yield f"http://127.0.0.1:{repo['port']}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def keyring(repo):
    root = _extract(_deb(repo, "debian12", "cuda-keyring"), repo["tmp"] / "keyring-root")
    return root / aptrepo.KEYRING_PATH.lstrip("/")


@pytest.fixture(scope="module")
def driver_root(repo):
    return _extract(_deb(repo, "debian12", "nvidia-driver-580"), repo["tmp"] / "driver-root")


@pytest.fixture(scope="module")
def toolkit_root(repo):
    root = repo["tmp"] / "toolkit-root"
    for name in ("cuda-libraries-12-4", "cuda-nvcc-12-4", "cuda-toolkit-12-4"):
        _extract(_deb(repo, "debian12", name), root)
    return root


class PrivateApt:
    """apt-get with its own configuration, sources, state, cache and (no) trusted keys."""

    def __init__(self, base: Path, sources_line: str):
        self.base = base
        empty = base / "empty"
        for d in (empty, base / "state/lists/partial", base / "cache/archives/partial", base / "log"):
            d.mkdir(parents=True, exist_ok=True)
        (base / "status").write_text("")
        (base / "sources.list").write_text(sources_line + "\n")
        settings = {
            "Dir::Etc::parts": empty, "Dir::Etc::main": empty / "none.conf",
            "Dir::Etc::sourcelist": base / "sources.list", "Dir::Etc::sourceparts": empty,
            "Dir::Etc::trusted": empty / "none.gpg", "Dir::Etc::trustedparts": empty,
            "Dir::Etc::preferences": empty / "none.pref", "Dir::Etc::preferencesparts": empty,
            "Dir::State": base / "state", "Dir::State::status": base / "status",
            "Dir::Cache": base / "cache", "Dir::Log": base / "log",
            "Debug::NoLocking": "1", "APT::Sandbox::User": "root", "APT::Architecture": "amd64",
            "APT::Architectures": "amd64", "Acquire::Languages": "none", "Acquire::http::Proxy": "DIRECT",
        }
        # APT_CONFIG is read before /etc/apt/apt.conf.d, so the host's apt settings stay out.
        (base / "apt.conf").write_text("".join(f'{k} "{v}";\n' for k, v in settings.items()))
        self.env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
        self.env.update(APT_CONFIG=str(base / "apt.conf"), LC_ALL="C")

    def __call__(self, *args, cwd=None):
        return _run("apt-get", "-q", *args, check=False, env=self.env, cwd=cwd or self.base)


def _sources_line(keyring, url):
    return f"deb [signed-by={keyring}] {url} /"


# --------------------------------------------------------------------------------------------
# The built tree


def test_build_is_fast_and_laid_out_like_nvidia(repo):
    assert repo["wall"] < 60
    for distro in aptrepo.DISTROS:
        folder = Path(repo["root"]) / distro / "x86_64"
        assert folder == Path(repo["distros"][distro]["dir"])
        for name in ("Packages", "Packages.gz", "Release", "InRelease", "Release.gpg"):
            assert (folder / name).is_file(), (distro, name)
        assert gzip.decompress((folder / "Packages.gz").read_bytes()) == (folder / "Packages").read_bytes()
    size = sum(p.stat().st_size for p in Path(repo["www"]).rglob("*") if p.is_file())
    assert size < 5 * 2**20


def test_inrelease_and_release_gpg_verify_with_the_keyring_from_the_deb(repo, keyring, tmp_path):
    assert keyring.read_bytes()[:1] != b"-"  # binary keyring, as apt's signed-by .gpg wants
    for distro in ("debian12", "ubuntu2404"):
        folder = Path(repo["distros"][distro]["dir"])
        gpgv = ["gpgv", "--homedir", tmp_path, "--keyring", keyring]
        out = _run(*gpgv, folder / "InRelease")
        assert "Good signature" in out.stderr
        _run(*gpgv, folder / "Release.gpg", folder / "Release")
        release = (folder / "Release").read_text()
        assert re.search(r"^Origin: NVIDIA$", release, re.M)
        sha = __import__("hashlib").sha256((folder / "Packages").read_bytes()).hexdigest()
        assert re.search(rf"^ {sha} +\d+ Packages$", release, re.M)


def test_keyring_deb_installs_key_and_source_list(repo, keyring):
    listfile = keyring.parents[3] / "etc/apt/sources.list.d/cuda-debian12-x86_64.list"
    assert listfile.read_text() == (
        f"deb [signed-by=/usr/share/keyrings/cuda-archive-keyring.gpg] "
        f"http://127.0.0.1:{repo['port']}/compute/cuda/repos/debian12/x86_64/ /\n")
    assert keyring.read_bytes() == Path(repo["keyring"]).read_bytes()
    info = _run("dpkg-deb", "-f", _deb(repo, "debian12", "cuda-keyring"), "Version", "Architecture").stdout
    assert info.split() == ["Version:", "1.1-1", "Architecture:", "all"]


@pytest.mark.parametrize("distro", ["debian12", "ubuntu2404"])
def test_packages_index(repo, distro):
    idx = _packages(repo, distro)
    drivers = {"535": "535.261.03-1", "550": "550.163.01-1", "570": "570.195.03-1", "580": "580.95.05-1"}
    for branch, v in drivers.items():
        assert set(idx[f"nvidia-driver-{branch}"]) == {v}
        assert idx[f"cuda-drivers-{branch}"][v]["Depends"] == f"nvidia-driver-{branch} (= {v})"
        assert idx["cuda-drivers"][v]["Depends"] == f"cuda-drivers-{branch} (= {v})"
    assert set(idx["cuda-drivers"]) == set(drivers.values())
    assert "cuda-drivers-515" not in idx and "nvidia-driver-515" not in idx
    for pkg, v in {"cuda-toolkit-11-8": "11.8.0-1", "cuda-toolkit-12-1": "12.1.1-1",
                   "cuda-toolkit-12-4": "12.4.1-1", "cuda-toolkit-12-8": "12.8.1-1",
                   "cuda-toolkit-13-0": "13.0.2-1"}.items():
        assert set(idx[pkg]) == {v}
    assert idx["cuda-toolkit-12-4"]["12.4.1-1"]["Depends"] == \
        "cuda-libraries-12-4 (>= 12.4.1-1), cuda-nvcc-12-4 (>= 12.4.131-1)"
    assert idx["cuda-12-4"]["12.4.1-1"]["Depends"] == \
        "cuda-toolkit-12-4 (= 12.4.1-1), cuda-drivers (>= 550.54.14)"
    assert set(idx["libcudnn8"]) == {"8.9.7.29-1+cuda12.2", "8.9.7.29-1+cuda11.8"}
    assert idx["libcudnn8-dev"]["8.9.7.29-1+cuda11.8"]["Depends"] == "libcudnn8 (= 8.9.7.29-1+cuda11.8)"
    assert set(idx["libcudnn9-cuda-12"]) == {"9.5.1.17-1"}
    assert set(idx["libcudnn9-cuda-13"]) == {"9.13.0.50-1"}
    assert idx["cudnn9-cuda-12"]["9.5.1.17-1"]["Depends"] == "libcudnn9-cuda-12 (= 9.5.1.17-1)"
    assert set(idx["cuda-keyring"]) == {"1.1-1"}


def test_old_branch_only_where_nvidia_has_it(repo):
    assert "cuda-drivers-515" in _packages(repo, "ubuntu2204")
    assert "cuda-drivers-515" not in _packages(repo, "ubuntu2404")


def test_driver_versions_meet_cuda_minimums(repo):
    aptrepo.check_versions()
    for branch, (full, cuda, _) in aptrepo.DRIVERS.items():
        assert aptrepo.vtuple(full) >= aptrepo.vtuple(aptrepo.MIN_DRIVER[cuda]), branch
    idx = _packages(repo, "debian12")
    newest = max(idx["cuda-drivers"], key=lambda v: aptrepo.vtuple(v.split("-")[0]))
    for xy in aptrepo.TOOLKITS:
        minimum = aptrepo.MIN_DRIVER[xy]
        _run("dpkg", "--compare-versions", newest, "ge", minimum)


def test_driver_deb_contents(repo):
    listing = _run("dpkg-deb", "-c", _deb(repo, "debian12", "nvidia-driver-580")).stdout
    for path in ("./usr/lib/x86_64-linux-gnu/libcuda.so.580.95.05",
                 "./usr/lib/x86_64-linux-gnu/libcuda.so.1 -> libcuda.so.580.95.05",
                 "./usr/lib/x86_64-linux-gnu/libnvidia-ml.so.1 -> libnvidia-ml.so.580.95.05",
                 "./usr/bin/nvidia-smi", "./usr/src/nvidia-580.95.05/dkms.conf",
                 "./usr/share/doc/nvidia-driver-580/version"):
        assert path in listing
    assert "root/root" in listing


def test_toolkit_ships_only_a_stub_libcuda(repo):
    listing = _run("dpkg-deb", "-c", _deb(repo, "debian12", "cuda-libraries-12-4")).stdout
    assert "./usr/local/cuda-12.4/lib64/stubs/libcuda.so" in listing
    assert "./usr/local/cuda-12.4/lib64/libcuda.so" not in listing
    assert "./usr/local/cuda-12.4/lib64/libcudart.so -> libcudart.so.12" in listing


def test_rebuild_is_idempotent_and_fast(repo):
    folder = Path(repo["distros"]["debian12"]["dir"])
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in folder.iterdir()}
    again = aptrepo.build_repo(repo["www"], repo["base_url"])
    assert again["fingerprint"] == repo["fingerprint"]
    assert again["debs_built"] == 0
    assert again["seconds"] < 10
    after = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in folder.iterdir()}
    assert after == before


def test_cli_builds_one_distro(tmp_path):
    out = _run(sys.executable, "-m", "lab.aptrepo", "--out", tmp_path / "www", "--distro", "ubuntu2404",
               "--base-url", "http://127.0.0.1:9/compute/cuda/repos", cwd=Path(__file__).parents[1])
    assert "ubuntu2404:" in out.stdout
    folder = tmp_path / "www/compute/cuda/repos/ubuntu2404/x86_64"
    assert (folder / "InRelease").is_file() and not (tmp_path / "www/compute/cuda/repos/debian12").exists()
    assert (tmp_path / "gnupg").is_dir()


def test_no_gpg_agent_outlives_the_build(repo):
    out = _run("gpg-connect-agent", "--homedir", repo["gnupg_home"], "--no-autostart", "getinfo pid", "/bye",
               check=False)
    assert not re.search(r"^D \d+", out.stdout, re.M)


# --------------------------------------------------------------------------------------------
# A real apt against the served repository


def test_apt_update_download_and_resolve(repo, server, keyring, tmp_path):
    apt = PrivateApt(tmp_path, _sources_line(keyring, f"{repo['base_url']}/debian12/x86_64/"))
    update = apt("update")
    assert update.returncode == 0, update.stdout + update.stderr
    assert not re.search(r"^(W|E):", update.stdout + update.stderr, re.M), update.stdout + update.stderr

    dl = apt("download", "cuda-drivers-580", "cuda-toolkit-12-4", "libcudnn8")
    assert dl.returncode == 0, dl.stdout + dl.stderr
    assert sorted(p.name for p in tmp_path.glob("*.deb")) == [
        "cuda-drivers-580_580.95.05-1_amd64.deb", "cuda-toolkit-12-4_12.4.1-1_amd64.deb",
        "libcudnn8_8.9.7.29-1+cuda12.2_amd64.deb"]

    sim = apt("-s", "install", "cuda-drivers", "cuda-toolkit-12-4", "libcudnn8", "cudnn9-cuda-12")
    assert sim.returncode == 0, sim.stdout + sim.stderr
    for inst in ("Inst nvidia-driver-580 (580.95.05-1", "Inst cuda-libraries-12-4 (12.4.1-1",
                 "Inst cuda-nvcc-12-4 (12.4.131-1", "Inst libcudnn8 (8.9.7.29-1+cuda12.2",
                 "Inst libcudnn9-cuda-12 (9.5.1.17-1"):
        assert inst in sim.stdout

    # cuda-12-1 wants cuda-drivers >= 530.30.02; apt takes the newest branch.
    sim = apt("-s", "install", "cuda-12-1")
    assert sim.returncode == 0 and "Inst nvidia-driver-580 (580.95.05-1" in sim.stdout

    # One driver branch at a time; 515 does not exist for debian12.
    assert apt("-s", "install", "cuda-drivers-535", "cuda-drivers-580").returncode != 0
    missing = apt("-s", "install", "cuda-drivers-515")
    assert missing.returncode != 0 and "Unable to locate package cuda-drivers-515" in missing.stderr


def _tampered_copy(repo, name):
    src = Path(repo["distros"]["debian12"]["dir"])
    dst = Path(repo["www"]) / "lab-tampered" / name / "x86_64"
    shutil.copytree(src, dst)
    return dst, f"http://127.0.0.1:{repo['port']}/lab-tampered/{name}/x86_64/"


def test_apt_rejects_a_tampered_packages_file(repo, server, keyring, tmp_path):
    folder, url = _tampered_copy(repo, "packages")
    packages = (folder / "Packages").read_bytes().replace(b"Version: 580.95.05-1", b"Version: 580.95.06-1")
    (folder / "Packages").write_bytes(packages)
    (folder / "Packages.gz").write_bytes(gzip.compress(packages))
    out = PrivateApt(tmp_path, _sources_line(keyring, url))("update")
    assert out.returncode != 0
    assert re.search(r"Hash Sum mismatch|unexpected size", out.stdout + out.stderr), out.stdout + out.stderr


def test_apt_rejects_a_tampered_inrelease(repo, server, keyring, tmp_path):
    folder, url = _tampered_copy(repo, "inrelease")
    text = (folder / "InRelease").read_text()
    (folder / "InRelease").write_text(text.replace("Label: NVIDIA CUDA", "Label: NVIDIA CUDB"))
    out = PrivateApt(tmp_path, _sources_line(keyring, url))("update")
    assert out.returncode != 0
    assert re.search(r"BADSIG|signatures were invalid|is not signed", out.stdout + out.stderr), \
        out.stdout + out.stderr


def test_apt_rejects_a_foreign_key(repo, server, tmp_path):
    other = aptrepo._Gpg(tmp_path / "other-gnupg")
    try:
        fpr = other.ensure_key()
        (tmp_path / "other.gpg").write_bytes(other.run("--export", fpr).stdout)
    finally:
        other.close()
    line = _sources_line(tmp_path / "other.gpg", f"{repo['base_url']}/debian12/x86_64/")
    out = PrivateApt(tmp_path / "apt", line)("update")
    assert out.returncode != 0
    assert re.search(r"NO_PUBKEY|is not signed", out.stdout + out.stderr), out.stdout + out.stderr


# --------------------------------------------------------------------------------------------
# The payloads


def _smi(driver_root, sim_file, *args):
    env = dict(os.environ, LAB_ROOT=str(driver_root), LAB_GPU_SIM_FILE=str(sim_file))
    return _run("sh", driver_root / "usr/bin/nvidia-smi", *args, check=False, env=env)


def test_nvidia_smi_without_driver(driver_root, tmp_path):
    out = _smi(driver_root, tmp_path / "absent.json")
    assert out.returncode == 9
    assert out.stdout.splitlines()[0] == NO_DRIVER
    # A simulated GPU without a loaded module is the same failure.
    (tmp_path / "gpus.json").write_text(json.dumps({"gpus": [H100]}))
    assert _smi(driver_root, tmp_path / "gpus.json").returncode == 9


def test_nvidia_smi_version_mismatch(driver_root, tmp_path):
    sim = tmp_path / "gpus.json"
    sim.write_text(json.dumps({"gpus": [H100], "kernel_module_version": "570.195.03"}))
    out = _smi(driver_root, sim, "--query-gpu=name", "--format=csv")
    assert out.returncode == 18
    assert out.stdout.splitlines() == ["Failed to initialize NVML: Driver/library version mismatch",
                                       "NVML library version: 580.95"]


def test_nvidia_smi_queries_the_simulated_gpu(driver_root, tmp_path):
    sim = tmp_path / "gpus.json"
    sim.write_text(json.dumps({"gpus": [H100], "kernel_module_version": "580.95.05"}, indent=2))
    fields = "--query-gpu=name,memory.total,compute_cap,driver_version,pci.bus_id"
    out = _smi(driver_root, sim, fields, "--format=csv,noheader,nounits")
    assert (out.returncode, out.stdout) == (0, "NVIDIA H100 80GB HBM3, 81559, 9.0, 580.95.05, 00000000:01:00.0\n")
    out = _smi(driver_root, sim, "--query-gpu=memory.total,name", "--format=csv")
    assert out.stdout == "memory.total [MiB], name\n81559 MiB, NVIDIA H100 80GB HBM3\n"
    out = _smi(driver_root, sim, "--query-gpu", "driver_version", "--format", "csv,noheader")
    assert out.stdout == "580.95.05\n"
    assert _smi(driver_root, sim, "--query-gpu=bogus", "--format=csv").returncode == 2
    table = _smi(driver_root, sim)
    assert table.returncode == 0
    assert re.search(r"Driver Version: 580\.95\.05 +CUDA Version: 13\.0", table.stdout)
    assert "NVIDIA H100 80GB HBM3" in table.stdout and "81559MiB" in table.stdout
    assert {len(line) for line in table.stdout.splitlines() if line.startswith(("|", "+"))} == {91}


def test_nvidia_smi_several_gpus(driver_root, tmp_path):
    sim = tmp_path / "gpus.json"
    sim.write_text(json.dumps({"kernel_module_version": "580.95.05",
                               "gpus": [H100, dict(H100, pci="00000000:02:00.0")]}))
    out = _smi(driver_root, sim, "--query-gpu=index,pci.bus_id", "--format=csv,noheader")
    assert out.stdout == "0, 00000000:01:00.0\n1, 00000000:02:00.0\n"
    assert _smi(driver_root, sim, "-L").stdout.count("NVIDIA H100 80GB HBM3") == 2


def test_driver_postinst_warns_but_succeeds(repo, tmp_path):
    _run("dpkg-deb", "-e", _deb(repo, "debian12", "nvidia-driver-580"), tmp_path / "ctl")
    fakebin = tmp_path / "bin"
    fakebin.mkdir()
    (fakebin / "modprobe").write_text("#!/bin/sh\necho 'modprobe: FATAL: Module nvidia not found.' >&2\nexit 1\n")
    (fakebin / "modprobe").chmod(0o755)
    env = dict(os.environ, PATH=f"{fakebin}:{os.environ['PATH']}")
    out = _run("sh", tmp_path / "ctl/postinst", "configure", check=False, env=env)
    assert out.returncode == 0
    assert "WARNING: nvidia-driver-580 (580.95.05): could not load the nvidia kernel module" in out.stderr


def test_toolkit_scripts_manage_alternatives(repo, tmp_path):
    _run("dpkg-deb", "-e", _deb(repo, "debian12", "cuda-toolkit-12-4"), tmp_path / "ctl")
    fakebin = tmp_path / "bin"
    fakebin.mkdir()
    log = tmp_path / "calls"
    (fakebin / "update-alternatives").write_text(f'#!/bin/sh\necho "$*" >> {log}\n')
    (fakebin / "update-alternatives").chmod(0o755)
    env = dict(os.environ, PATH=f"{fakebin}:{os.environ['PATH']}")
    _run("sh", tmp_path / "ctl/postinst", "configure", env=env)
    _run("sh", tmp_path / "ctl/prerm", "upgrade", env=env)
    _run("sh", tmp_path / "ctl/prerm", "remove", env=env)
    assert log.read_text().splitlines() == [
        "--install /usr/local/cuda cuda /usr/local/cuda-12.4 124",
        "--install /usr/local/cuda-12 cuda-12 /usr/local/cuda-12.4 124",
        "--remove cuda /usr/local/cuda-12.4",
        "--remove cuda-12 /usr/local/cuda-12.4"]


def test_libcuda_loads_and_reports_no_device(driver_root):
    lib = ctypes.CDLL(str(driver_root / "usr/lib/x86_64-linux-gnu/libcuda.so.1"))
    version = ctypes.c_int()
    assert lib.cuDriverGetVersion(ctypes.byref(version)) == 0
    assert version.value == 13000
    assert lib.cuInit(0) == 100  # CUDA_ERROR_NO_DEVICE
    text = ctypes.c_char_p()
    assert lib.cuGetErrorString(100, ctypes.byref(text)) == 0
    assert text.value == b"no CUDA-capable device is detected"
    nvml = ctypes.CDLL(str(driver_root / "usr/lib/x86_64-linux-gnu/libnvidia-ml.so.1"))
    assert nvml.nvmlInit_v2() == 9  # NVML_ERROR_DRIVER_NOT_LOADED


def test_toolkit_payload(toolkit_root):
    top = toolkit_root / "usr/local/cuda-12.4"
    assert json.loads((top / "version.json").read_text())["cuda"] == {"name": "CUDA SDK", "version": "12.4.1"}
    out = _run("sh", top / "bin/nvcc", "--version").stdout
    assert "Cuda compilation tools, release 12.4, V12.4.131" in out
    cudart = ctypes.CDLL(str(top / "lib64/libcudart.so"))
    count, version = ctypes.c_int(), ctypes.c_int()
    assert cudart.cudaGetDeviceCount(ctypes.byref(count)) == 35
    assert cudart.cudaRuntimeGetVersion(ctypes.byref(version)) == 0 and version.value == 12040
    cudart.cudaGetErrorString.restype = ctypes.c_char_p
    assert cudart.cudaGetErrorString(35) == b"CUDA driver version is insufficient for CUDA runtime version"
    stub = ctypes.CDLL(str(top / "lib64/stubs/libcuda.so"))
    assert stub.cuInit(0) == 34  # CUDA_ERROR_STUB_LIBRARY
    for name in ("libcublasLt.so", "libnvrtc.so"):
        ctypes.CDLL(str(top / "lib64" / name))


def test_libraries_need_no_new_glibc(repo, driver_root, toolkit_root):
    if not shutil.which("objdump"):
        pytest.skip("objdump missing")
    libs = [p for root in (driver_root, toolkit_root) for p in root.rglob("*.so*") if not p.is_symlink()]
    assert len(libs) >= 6
    for lib in libs:
        assert not re.search(r"GLIBC_2\.(2[89]|3\d)", _run("objdump", "-T", lib).stdout), lib


def test_cpm_kernels_sees_a_toolkit_without_a_driver(toolkit_root):
    # Not imported here: in this process the stand-in libcuda.so.1 may already be loaded.
    if importlib.util.find_spec("cpm_kernels") is None:
        pytest.skip("cpm_kernels not installed")
    env = dict(os.environ, CUDA_PATH=str(toolkit_root / "usr/local/cuda-12.4"))
    out = _run(sys.executable, "-c", "import cpm_kernels", check=False, env=env)
    assert out.returncode != 0
    assert "CUDA driver version is insufficient for CUDA runtime version" in out.stderr


def test_a_real_cudart_accepts_the_stand_in_libcuda(driver_root):
    """Where a real CUDA runtime is installed, it loads libcuda.so.1 from the driver package
    and reports what it would on a host whose kernel module is not loaded."""
    probe = ("import ctypes, ctypes.util, sys\n"
             "name = ctypes.util.find_library('cudart')\n"
             "if not name: sys.exit(77)\n"
             "rt = ctypes.CDLL(name); n, v = ctypes.c_int(), ctypes.c_int()\n"
             "print(rt.cudaDriverGetVersion(ctypes.byref(v)), v.value, rt.cudaGetDeviceCount(ctypes.byref(n)))\n")
    env = dict(os.environ, LD_LIBRARY_PATH=str(driver_root / "usr/lib/x86_64-linux-gnu"))
    out = _run(sys.executable, "-c", probe, check=False, env=env)
    if out.returncode == 77:
        pytest.skip("no real libcudart on this machine")
    assert out.stdout.split() == ["0", "13000", "100"], out.stdout + out.stderr
