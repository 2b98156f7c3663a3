"""A signed apt repository shaped like NVIDIA's CUDA repository, for lab hosts without a GPU.

Layout, package names, versions and dependencies follow
https://developer.download.nvidia.com/compute/cuda/repos/<distro>/x86_64/ (docs/upstream.md §5): one flat
repository per distro, signed by a key that the distro's cuda-keyring package installs. Payloads are
tiny stand-ins (lab/aptrepo_payload/) that leave evidence a test can check: real shared libraries
that load with ctypes but find no GPU, an nvidia-smi that answers from a simulation file, an nvcc
that only tells its version.

    python -m lab.aptrepo --out DIR --base-url http://127.0.0.1:PORT/compute/cuda/repos
"""

from __future__ import annotations

import argparse
import ctypes
import gzip
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PAYLOAD = Path(__file__).with_name("aptrepo_payload")
DISTROS = ("debian11", "debian12", "ubuntu2004", "ubuntu2204", "ubuntu2404")
KEYRING_PATH = "/usr/share/keyrings/cuda-archive-keyring.gpg"
KEY_UID = "CUDA lab repository (test only, not NVIDIA) <cuda-lab@localhost>"
MAINTAINER = "CUDA lab repository <cuda-lab@localhost>"
LIBDIR = "usr/lib/x86_64-linux-gnu"
PR_SET_CHILD_SUBREAPER, PR_GET_CHILD_SUBREAPER = 36, 37

# Minimum Linux driver per CUDA release (CUDA release notes, table 3; docs/upstream.md §5).
MIN_DRIVER = {"11.7": "515.43.04", "11.8": "520.61.05", "12.1": "530.30.02", "12.2": "535.54.03",
              "12.4": "550.54.14", "12.8": "570.26", "13.0": "580.65.06"}

# branch: (full version, CUDA version the driver reports, distros carrying it; None = all).
# 515 is absent from ubuntu2404 (and from the newer repos) as in NVIDIA's repo.
DRIVERS = {
    "515": ("515.105.01", "11.7", ("debian11", "ubuntu2004", "ubuntu2204")),
    "535": ("535.261.03", "12.2", None),
    "550": ("550.163.01", "12.4", None),
    "570": ("570.195.03", "12.8", None),
    "580": ("580.95.05", "13.0", None),
}

# X.Y: (toolkit, libcudart, libcublasLt, libnvrtc, nvcc) versions as in the real releases.
TOOLKITS = {
    "11.8": ("11.8.0", "11.8.89", "11.11.3.6", "11.8.89", "11.8.89"),
    "12.1": ("12.1.1", "12.1.105", "12.1.3.1", "12.1.105", "12.1.105"),
    "12.4": ("12.4.1", "12.4.127", "12.4.5.8", "12.4.127", "12.4.131"),
    "12.8": ("12.8.1", "12.8.90", "12.8.4.1", "12.8.93", "12.8.93"),
    "13.0": ("13.0.2", "13.0.96", "13.1.0.3", "13.0.88", "13.0.88"),
}

# (package, version, library version, CUDA it was built for)
CUDNN = (
    ("libcudnn8", "8.9.7.29-1+cuda12.2", "8.9.7", "12.2"),
    ("libcudnn8", "8.9.7.29-1+cuda11.8", "8.9.7", "11.8"),
    ("libcudnn9-cuda-12", "9.5.1.17-1", "9.5.1", "12.6"),
    ("libcudnn9-cuda-13", "9.13.0.50-1", "9.13.0", "13.0"),
)


def vtuple(version: str) -> tuple[int, ...]:
    return tuple(int(x) for x in version.split("."))


def cuda_code(xy: str) -> int:
    """CUDA X.Y as the APIs report it: 12.4 -> 12040."""
    major, minor = xy.split(".")
    return int(major) * 1000 + int(minor) * 10


def check_versions() -> None:
    """Every driver must be new enough for the CUDA it claims, every toolkit must have a driver."""
    for branch, (full, cuda, _) in DRIVERS.items():
        if vtuple(full) < vtuple(MIN_DRIVER[cuda]):
            raise ValueError(f"driver {full} is older than {MIN_DRIVER[cuda]}, the minimum for CUDA {cuda}")
    newest = max(vtuple(full) for full, _, _ in DRIVERS.values())
    for xy in TOOLKITS:
        if newest < vtuple(MIN_DRIVER[xy]):
            raise ValueError(f"no driver branch serves CUDA {xy}")


def sources_line(base_url: str, distro: str) -> str:
    return f"deb [signed-by={KEYRING_PATH}] {base_url.rstrip('/')}/{distro}/x86_64/ /"


def _subst(text: str, **subst) -> str:
    for key, value in subst.items():
        text = text.replace(f"@{key}@", str(value))
    return text


def _template(name: str, **subst) -> bytes:
    return _subst((PAYLOAD / name).read_text(), **subst).encode()


def _deb(name, version, desc, files=None, arch="amd64", scripts=None, conffiles=(), triggers="", **rel):
    """A package spec. files: path -> bytes (0644), (bytes, mode), or str (symlink target)."""
    return dict(name=name, version=version, desc=desc, files=files or {}, arch=arch,
                scripts=scripts or {}, conffiles=conffiles, triggers=triggers,
                rel={k.capitalize(): v for k, v in rel.items() if v})


# ---------------------------------------------------------------------------------------------
# Package specs


DRIVER_POSTINST = """#!/bin/sh
set -e
# Loading the module always fails on the lab hosts (no GPU, no module build). As with the real
# packages, the install still succeeds: the failure shows only as a warning and in nvidia-smi.
if [ "$1" = configure ]; then
    if ! modprobe nvidia; then
        echo "WARNING: nvidia-driver-@BRANCH@ (@VERSION@): could not load the nvidia kernel module." >&2
        echo "WARNING: nvidia-smi and CUDA will not work until the module loads; a reboot is usually needed." >&2
    fi
fi
exit 0
"""

TOOLKIT_POSTINST = """#!/bin/sh
set -e
# As NVIDIA's cuda-toolkit-config-common: /usr/local/cuda and /usr/local/cuda-@MAJOR@ follow the
# newest installed toolkit unless an admin picks one.
if [ "$1" = configure ]; then
    update-alternatives --install /usr/local/cuda cuda /usr/local/cuda-@XY@ @PRIO@
    update-alternatives --install /usr/local/cuda-@MAJOR@ cuda-@MAJOR@ /usr/local/cuda-@XY@ @PRIO@
fi
"""

TOOLKIT_PRERM = """#!/bin/sh
set -e
if [ "$1" = remove ] || [ "$1" = deconfigure ]; then
    update-alternatives --remove cuda /usr/local/cuda-@XY@
    update-alternatives --remove cuda-@MAJOR@ /usr/local/cuda-@XY@
fi
"""


def _keyring_debs(distro, base_url, keyring):
    listfile = f"etc/apt/sources.list.d/cuda-{distro}-x86_64.list"
    return [_deb("cuda-keyring", "1.1-1", "GPG keyring and source list for the CUDA repository (lab)",
                 arch="all", conffiles=["/" + listfile],
                 files={KEYRING_PATH[1:]: keyring,
                        listfile: (sources_line(base_url, distro) + "\n").encode()})]


def _driver_debs(branch, full, cuda, lib):
    version = f"{full}-1"
    files = {
        f"{LIBDIR}/libcuda.so.{full}": lib("libcuda.c", "libcuda.so.1", LAB_CUDA_VERSION=cuda_code(cuda)),
        f"{LIBDIR}/libcuda.so.1": f"libcuda.so.{full}",
        f"{LIBDIR}/libnvidia-ml.so.{full}": lib("libnvidia-ml.c", "libnvidia-ml.so.1",
                                                 LAB_DRIVER_VERSION=f'"{full}"'),
        f"{LIBDIR}/libnvidia-ml.so.1": f"libnvidia-ml.so.{full}",
        "usr/bin/nvidia-smi": (_template("nvidia-smi.sh", BRANCH=branch, CUDA=cuda), 0o755),
        f"usr/src/nvidia-{full}/dkms.conf": (
            f'PACKAGE_NAME="nvidia"\nPACKAGE_VERSION="{full}"\nBUILT_MODULE_NAME[0]="nvidia"\n'
            'DEST_MODULE_LOCATION[0]="/kernel/drivers/video"\nAUTOINSTALL="yes"\n'
            "# lab stand-in: there is no module source; lab hosts cannot load modules\n").encode(),
        f"usr/share/doc/nvidia-driver-{branch}/version": f"{full}\n".encode(),
    }
    postinst = _subst(DRIVER_POSTINST, BRANCH=branch, VERSION=full)
    return [
        # Provides+Conflicts+Replaces the same virtual name: one branch at a time, and apt may
        # switch branches (the old userspace goes, the loaded module stays: a version mismatch).
        _deb(f"nvidia-driver-{branch}", version, f"NVIDIA driver {branch} (lab stand-in, CUDA {cuda})",
             files=files, scripts={"postinst": postinst}, triggers="activate-noawait ldconfig\n",
             provides="nvidia-driver-binary", conflicts="nvidia-driver-binary",
             replaces="nvidia-driver-binary"),
        _deb(f"cuda-drivers-{branch}", version, f"CUDA driver metapackage for branch {branch} (lab)",
             depends=f"nvidia-driver-{branch} (= {version})"),
        # One cuda-drivers version per branch, as NVIDIA ships it: the newest is the candidate.
        _deb("cuda-drivers", version, "CUDA driver metapackage (lab)",
             depends=f"cuda-drivers-{branch} (= {version})"),
    ]


def _toolkit_debs(xy, lib):
    full, cudart, cublas, nvrtc, nvcc = TOOLKITS[xy]
    major, minor = xy.split(".")
    dash, top = f"{major}-{minor}", f"usr/local/cuda-{xy}"
    lib64 = f"{top}/lib64"
    cudart_so = "11.0" if major == "11" else major  # sonames as the real libraries have them
    nvrtc_so = "11.2" if major == "11" else major
    cb = vtuple(cublas)
    files = {
        f"{lib64}/libcudart.so.{cudart}": lib("libcudart.c", f"libcudart.so.{cudart_so}",
                                               LAB_CUDART_VERSION=cuda_code(xy)),
        f"{lib64}/libcudart.so.{cudart_so}": f"libcudart.so.{cudart}",
        f"{lib64}/libcudart.so": f"libcudart.so.{cudart_so}",
        f"{lib64}/libcublasLt.so.{cublas}": lib(
            "libcublasLt.c", f"libcublasLt.so.{major}",
            LAB_CUBLAS_VERSION=cb[0] * 10000 + cb[1] * 100 + cb[2], LAB_CUDART_VERSION=cuda_code(xy)),
        f"{lib64}/libcublasLt.so.{major}": f"libcublasLt.so.{cublas}",
        f"{lib64}/libcublasLt.so": f"libcublasLt.so.{major}",
        f"{lib64}/libnvrtc.so.{nvrtc}": lib("libnvrtc.c", f"libnvrtc.so.{nvrtc_so}",
                                             LAB_NVRTC_MAJOR=major, LAB_NVRTC_MINOR=minor),
        f"{lib64}/libnvrtc.so.{nvrtc_so}": f"libnvrtc.so.{nvrtc}",
        f"{lib64}/libnvrtc.so": f"libnvrtc.so.{nvrtc_so}",
        # Only a link-time stub: libcuda.so itself belongs to the driver (docs/upstream.md §4).
        f"{lib64}/stubs/libcuda.so": lib("libcuda.c", "libcuda.so.1", LAB_STUB=1),
    }
    version_json = {
        "cuda": {"name": "CUDA SDK", "version": full},
        "cuda_cudart": {"name": "CUDA Runtime (cudart)", "version": cudart},
        "cuda_nvcc": {"name": "CUDA NVCC", "version": nvcc},
        "cuda_nvrtc": {"name": "CUDA NVRTC", "version": nvrtc},
        "libcublas": {"name": "CUDA cuBLAS", "version": cublas},
    }
    subst = dict(XY=xy, MAJOR=major, PRIO=int(major) * 10 + int(minor))
    v = f"{full}-1"
    return [
        _deb(f"cuda-libraries-{dash}", v, f"CUDA {xy} runtime libraries (lab stand-ins)", files=files),
        _deb(f"cuda-nvcc-{dash}", f"{nvcc}-1", f"CUDA {xy} nvcc (lab stand-in)",
             files={f"{top}/bin/nvcc": (_template("nvcc.sh", XY=xy, NVCC=nvcc), 0o755)}),
        _deb(f"cuda-toolkit-{dash}", v, f"CUDA Toolkit {xy} metapackage (lab)",
             depends=f"cuda-libraries-{dash} (>= {v}), cuda-nvcc-{dash} (>= {nvcc}-1)",
             files={f"{top}/version.json": (json.dumps(version_json, indent=3) + "\n").encode()},
             scripts={"postinst": _subst(TOOLKIT_POSTINST, **subst),
                      "prerm": _subst(TOOLKIT_PRERM, **subst)}),
        _deb("cuda-toolkit", v, "CUDA Toolkit metapackage, newest release (lab)",
             depends=f"cuda-toolkit-{dash} (= {v})"),
        # Like cuda-runtime-X-Y in NVIDIA's repo, cuda-X-Y pulls a driver new enough for it.
        _deb(f"cuda-{dash}", v, f"CUDA {xy} toolkit and driver (lab)",
             depends=f"cuda-toolkit-{dash} (= {v}), cuda-drivers (>= {MIN_DRIVER[xy]})"),
        _deb("cuda", v, "CUDA toolkit and driver, newest release (lab)", depends=f"cuda-{dash} (= {v})"),
    ]


def _cudnn_debs(lib):
    debs = []
    for name, version, libver, built_for in CUDNN:
        major = int(libver.split(".")[0])
        x, y, z = vtuple(libver)
        code = x * 1000 + y * 100 + z if major == 8 else x * 10000 + y * 100 + z
        so = lib("libcudnn.c", f"libcudnn.so.{major}", LAB_CUDNN_VERSION=code,
                 LAB_CUDART_VERSION=cuda_code(built_for), LAB_NOT_INITIALIZED=1 if major == 8 else 1001)
        files = {f"{LIBDIR}/libcudnn.so.{libver}": so, f"{LIBDIR}/libcudnn.so.{major}": f"libcudnn.so.{libver}"}
        desc = f"cuDNN {libver} runtime library for CUDA {built_for} (lab stand-in)"
        if major == 8:
            header = f"#define CUDNN_MAJOR {x}\n#define CUDNN_MINOR {y}\n#define CUDNN_PATCHLEVEL {z}\n"
            debs += [
                _deb(name, version, desc, files=files),
                _deb("libcudnn8-dev", version, f"cuDNN {libver} development files (lab)",
                     depends=f"libcudnn8 (= {version})",
                     files={"usr/include/x86_64-linux-gnu/cudnn_version_v8.h": header.encode(),
                            f"{LIBDIR}/libcudnn.so": "libcudnn.so.8"}),
            ]
        else:
            # Both cuDNN 9 flavours ship libcudnn.so.9 here, so only one can be installed.
            others = ", ".join(n for n, *_ in CUDNN if n.startswith("libcudnn9") and n != name)
            cuda_major = name.rsplit("-", 1)[1]
            debs += [
                _deb(name, version, desc, files=files, conflicts=others),
                _deb(f"cudnn9-cuda-{cuda_major}", version, f"cuDNN 9 for CUDA {cuda_major} metapackage (lab)",
                     depends=f"{name} (= {version})"),
            ]
    return debs


def package_specs(distro: str, base_url: str, keyring: bytes, lib) -> list[dict]:
    debs = _keyring_debs(distro, base_url, keyring)
    for branch, (full, cuda, only) in DRIVERS.items():
        if only is None or distro in only:
            debs += _driver_debs(branch, full, cuda, lib)
    for xy in TOOLKITS:
        debs += _toolkit_debs(xy, lib)
    return debs + _cudnn_debs(lib)


# ---------------------------------------------------------------------------------------------
# Building


def _control(d: dict) -> str:
    size = sum(1 if isinstance(f, str) else -(-len(f if isinstance(f, bytes) else f[0]) // 1024)
               for f in d["files"].values())
    lines = [f"Package: {d['name']}", f"Version: {d['version']}", f"Architecture: {d['arch']}",
             f"Maintainer: {MAINTAINER}", f"Installed-Size: {max(size, 1)}"]
    lines += [f"{k}: {v}" for k, v in sorted(d["rel"].items())]
    lines += ["Section: devel", "Priority: optional", f"Description: {d['desc']}",
              " Imitation of NVIDIA's package of the same name for lab hosts without a GPU; not NVIDIA software."]
    return "\n".join(lines) + "\n"


def _deb_filename(d: dict) -> str:
    return f"{d['name']}_{d['version'].split(':')[-1]}_{d['arch']}.deb"


class _Builder:
    """Compiles libraries and builds .debs into a cache keyed by their content, so a rebuild with
    unchanged inputs only relinks files."""

    def __init__(self, cache: Path):
        self.cache = cache
        self.built = 0
        (cache / "lib").mkdir(parents=True, exist_ok=True)
        (cache / "debs").mkdir(parents=True, exist_ok=True)

    def lib(self, source: str, soname: str, **defines) -> bytes:
        args = ["gcc", "-shared", "-fPIC", "-O2", "-s", "-Wall", "-Werror", f"-Wl,-soname,{soname}"]
        args += [f"-D{k}={v}" for k, v in sorted(defines.items())]
        src = (PAYLOAD / source).read_bytes()
        key = hashlib.sha256(src + "\0".join(args).encode()).hexdigest()[:20]
        out = self.cache / "lib" / f"{Path(source).stem}-{key}.so"
        if not out.exists():
            tmp = out.with_suffix(".tmp")
            subprocess.run(args + ["-o", str(tmp), str(PAYLOAD / source)], check=True, capture_output=True)
            os.replace(tmp, out)
        return out.read_bytes()

    def deb(self, d: dict) -> Path:
        control = _control(d)
        h = hashlib.sha256(control.encode())
        for part in (d["files"], d["scripts"]):
            for path, item in sorted(part.items()):
                h.update(repr((path, item)).encode())
        h.update(repr((d["conffiles"], d["triggers"])).encode())
        out = self.cache / "debs" / h.hexdigest()[:20] / _deb_filename(d)
        if out.exists():
            return out
        with tempfile.TemporaryDirectory(dir=self.cache) as tmp:
            root = Path(tmp, "root")
            for path, item in d["files"].items():
                target = root / path
                target.parent.mkdir(parents=True, exist_ok=True)
                if isinstance(item, str):
                    target.symlink_to(item)
                else:
                    data, mode = (item, 0o644) if isinstance(item, bytes) else item
                    target.write_bytes(data)
                    target.chmod(mode)
            meta = root / "DEBIAN"
            meta.mkdir(parents=True)
            (meta / "control").write_text(control)
            for name, text in d["scripts"].items():
                (meta / name).write_text(text)
                (meta / name).chmod(0o755)
            if d["conffiles"]:
                (meta / "conffiles").write_text("".join(f"{c}\n" for c in d["conffiles"]))
            if d["triggers"]:
                (meta / "triggers").write_text(d["triggers"])
            # dpkg-deb records directory modes as found; a restrictive umask must not leak into them.
            for dirpath, _, _ in os.walk(root):
                os.chmod(dirpath, 0o755)
            deb = Path(tmp, "out.deb")
            env = dict(os.environ, SOURCE_DATE_EPOCH="1700000000")
            subprocess.run(["dpkg-deb", "--root-owner-group", "-Zxz", "--build", str(root), str(deb)],
                           check=True, capture_output=True, env=env)
            out.parent.mkdir(exist_ok=True)
            os.replace(deb, out)
        self.built += 1
        return out


class _Gpg:
    """gpg with a private home. gpg starts its own agent, which daemonizes; the build adopts it
    (child subreaper), stops it and reaps it, so no agent or zombie outlives the build."""

    def __init__(self, home: Path):
        self.home = home
        home.mkdir(parents=True, exist_ok=True)
        home.chmod(0o700)
        self._prctl = ctypes.CDLL(None, use_errno=True).prctl
        was = ctypes.c_int()
        self._prctl(PR_GET_CHILD_SUBREAPER, ctypes.byref(was), 0, 0, 0)
        self._was_subreaper = was.value
        self._foreign_agent = self._agent_pid() is not None  # someone else's: leave it running
        self._prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)

    def _agent_pid(self) -> int | None:
        out = subprocess.run(["gpg-connect-agent", "--homedir", str(self.home), "--no-autostart",
                              "getinfo pid", "/bye"], capture_output=True, text=True).stdout
        pids = [int(line[2:]) for line in out.splitlines() if line.startswith("D ")]
        return pids[0] if pids else None

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(["gpg", "--homedir", str(self.home), "--batch", "--no-tty", *args],
                              check=check, capture_output=True)

    def fingerprint(self) -> str | None:
        out = self.run("--with-colons", "--list-secret-keys", KEY_UID, check=False).stdout.decode()
        fprs = [line.split(":")[9] for line in out.splitlines() if line.startswith("fpr:")]
        return fprs[0] if fprs else None

    def ensure_key(self) -> str:
        fpr = self.fingerprint()
        if fpr is None:
            self.run("--pinentry-mode", "loopback", "--passphrase", "", "--quick-gen-key", KEY_UID,
                     "ed25519", "sign", "never")
            fpr = self.fingerprint()
        return fpr

    def close(self) -> None:
        if not self._foreign_agent:
            pid = self._agent_pid()
            subprocess.run(["gpgconf", "--homedir", str(self.home), "--kill", "gpg-agent"], capture_output=True)
            if pid:
                try:
                    os.waitpid(pid, 0)
                except ChildProcessError:  # not adopted by us after all
                    pass
        self._prctl(PR_SET_CHILD_SUBREAPER, self._was_subreaper, 0, 0, 0)


def _write_if_changed(path: Path, data: bytes) -> bool:
    if path.exists() and path.read_bytes() == data:
        return False
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return True


def _place(src: Path, dst: Path) -> None:
    """Hard-link a cached .deb into a distro folder (a copy where links are impossible)."""
    if dst.exists() and os.path.samefile(src, dst):
        return
    tmp = dst.with_name(dst.name + ".tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def _hashes(data: bytes) -> dict[str, str]:
    return {name: hashlib.new(algo, data).hexdigest()
            for name, algo in (("MD5Sum", "md5"), ("SHA1", "sha1"), ("SHA256", "sha256"), ("SHA512", "sha512"))}


def _release(files: dict[str, bytes]) -> bytes:
    lines = ["Origin: NVIDIA", "Label: NVIDIA CUDA", "Architecture: x86_64",
             "Date: " + time.strftime("%a, %d %b %Y %H:%M:%S UTC", time.gmtime())]
    digests = {name: _hashes(data) for name, data in files.items()}
    for field in ("MD5Sum", "SHA1", "SHA256", "SHA512"):
        lines.append(f"{field}:")
        lines += [f" {digests[n][field]} {len(d):>16} {n}" for n, d in files.items()]
    return ("\n".join(lines) + "\n").encode()


def _publish(folder: Path, debs: list[tuple[dict, Path]], gpg: _Gpg, fpr: str, stamp: Path) -> None:
    stanzas = []
    for d, cached in debs:
        data = cached.read_bytes()
        fields = "".join(f"{k}: {v}\n" for k, v in _hashes(data).items()).replace("MD5Sum", "MD5sum")
        stanzas.append(_control(d) + f"Filename: ./{cached.name}\nSize: {len(data)}\n" + fields)
    packages = "\n".join(stanzas).encode()
    _write_if_changed(folder / "Packages", packages)
    _write_if_changed(folder / "Packages.gz", gzip.compress(packages, mtime=0))
    # Re-sign only when the index or the key changed, so an unchanged rebuild leaves Release alone.
    state = f"{fpr} {hashlib.sha256(packages).hexdigest()}\n"
    signed = [folder / n for n in ("Release", "InRelease", "Release.gpg")]
    if stamp.exists() and stamp.read_text() == state and all(p.exists() for p in signed):
        return
    (folder / "Release").write_bytes(_release({"Packages": packages, "Packages.gz": gzip.compress(packages, mtime=0)}))
    for args, name in ((["--clearsign"], "InRelease"), (["--detach-sign", "--armor"], "Release.gpg")):
        gpg.run("--yes", "--local-user", fpr, "--digest-algo", "SHA512", *args,
                "--output", str(folder / name), str(folder / "Release"))
    stamp.write_text(state)


def build_repo(out_dir, base_url, distros=DISTROS, gnupg_home=None) -> dict:
    """Build (or bring up to date) the repository under <out_dir>/compute/cuda/repos/."""
    started = time.monotonic()
    check_versions()
    unknown = set(distros) - set(DISTROS)
    if unknown:
        raise ValueError(f"unknown distros {sorted(unknown)}; known: {DISTROS}")
    out = Path(out_dir).resolve()
    builder = _Builder(out.parent / "aptrepo-cache")
    repos = out / "compute" / "cuda" / "repos"
    gpg = _Gpg(Path(gnupg_home).resolve() if gnupg_home else out.parent / "gnupg")
    result = {"root": str(repos), "base_url": base_url.rstrip("/"), "gnupg_home": str(gpg.home), "distros": {}}
    try:
        fpr = gpg.ensure_key()
        keyring = gpg.run("--export", fpr).stdout
        armored = gpg.run("--export", "--armor", fpr).stdout
        result.update(fingerprint=fpr, keyring=str(builder.cache / "cuda-archive-keyring.gpg"))
        _write_if_changed(builder.cache / "cuda-archive-keyring.gpg", keyring)
        for distro in distros:
            folder = repos / distro / "x86_64"
            folder.mkdir(parents=True, exist_ok=True)
            debs = [(d, builder.deb(d)) for d in package_specs(distro, base_url, keyring, builder.lib)]
            wanted = {cached.name for _, cached in debs}
            for stale in folder.glob("*.deb"):
                if stale.name not in wanted:
                    stale.unlink()
            for _, cached in debs:
                _place(cached, folder / cached.name)
            # NVIDIA also publishes the bare public key as <short key id>.pub in each folder.
            _write_if_changed(folder / f"{fpr[-8:].lower()}.pub", armored)
            _publish(folder, debs, gpg, fpr, builder.cache / f"signed-{distro}")
            result["distros"][distro] = {
                "dir": str(folder),
                "sources_line": sources_line(base_url, distro),
                "packages": [{"name": d["name"], "version": d["version"], "arch": d["arch"],
                              "filename": cached.name} for d, cached in debs],
            }
    finally:
        gpg.close()
    result.update(debs_built=builder.built, seconds=round(time.monotonic() - started, 2))
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lab.aptrepo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="directory to serve; the repo lands in compute/cuda/repos/")
    parser.add_argument("--base-url", required=True, help="URL of compute/cuda/repos as the lab hosts see it")
    parser.add_argument("--distro", action="append", choices=DISTROS, help="repeatable; default: all")
    parser.add_argument("--gnupg-home", help="signing key home (default: <out>/../gnupg)")
    args = parser.parse_args(argv)
    result = build_repo(args.out, args.base_url, tuple(args.distro or DISTROS), args.gnupg_home)
    for distro, info in result["distros"].items():
        print(f"{distro}: {len(info['packages'])} packages in {info['dir']}")
        print(f"  {info['sources_line']}")
    print(f"key {result['fingerprint']}; built {result['debs_built']} .debs in {result['seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
