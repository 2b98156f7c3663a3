"""What the Python environment of a host must be: pure functions, data files in, a plan out.

Settings (and the GPU plan's torch_tag) in, SettingError for bad inventory data, so that
every host's environment is known before any host is touched. operations/pyenv.py
carries the plan out.

Lock files (data/requirements/<name>.txt) are complete pinned sets installed with
`pip install --no-deps`. A line `# python: 3.11[, 3.12]` names the CPython versions the
set has wheels for. The lock's own `torch==X` pin is the CPU build; a CUDA build comes
from data/python.toml [torch.builds]. A lock without a torch line relies on the torch of
the host's system Python (venv_system_site_packages=True).
"""

import dataclasses
import functools
import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from .resolver import GpuPlan, version_tuple
from .settings import DATA, SettingError, Settings, check_url, load_toml


@dataclass(frozen=True)
class CondaInstaller:
    """The conda a host's env comes from (python_backend='conda')."""

    prefix: str          # where conda is installed
    installer: str       # miniforge, miniconda (data/python.toml [conda.installers])
    url: str             # the installer's URL (or its mirror's)
    sha256: str          # the installer's pinned sha256
    file: str            # where the installer is downloaded on the host
    channels: list[str]  # the channels .condarc lists
    mirror: str          # conda_mirror, '' for none


@dataclass(frozen=True)
class PythonPlan:
    """One host's Python environment: what the Python stage installs and checks."""

    backend: str                # conda or venv
    install_dir: str
    env: str                    # the env's prefix
    python: str                 # the env's interpreter
    interpreter: str            # the host's Python a venv is made from
    system_site_packages: bool  # venv_system_site_packages
    lock_name: str              # the requirements setting
    lock_text: str              # the lock without its torch line
    pins: dict                  # {normalized name: version} of the lock
    index: str                  # pip_index_url, '' for PyPI
    trusted_host: str           # the index's host when it is plain http
    torch_tag: str              # cpu, cu121, ...
    gpu: bool                   # CUDA must be available to torch
    gpu_caps: list[str]         # the GPUs' compute capabilities
    expect_cuda: str | None     # the CUDA torch must be built for, None on CPU
    torch: str | None           # '2.5.1+cu121', None: the system's torch
    torch_index: str            # PyTorch's wheel index for the tag (or a mirror)
    torch_deps: bool            # torch brings its own dependencies (CUDA builds)
    pythons: list[str]          # the Python versions the lock and torch support
    python_version: str = ""    # conda: the env's Python
    conda: CondaInstaller | None = None

HEX64 = re.compile(r"[0-9a-f]{64}")
PYVER = re.compile(r"3\.\d{1,2}")
CHANNEL = re.compile(r"[A-Za-z0-9_.\-]+|https?://\S+")


def python_data() -> dict:
    """data/python.toml (parsed once per run; shared, do not modify)."""
    return load_toml("python.toml")


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def lock_path(requirements: str) -> Path:
    """A lock file: a name in data/requirements/ (without .txt) or an absolute path."""
    if "/" in requirements:
        return Path(requirements)
    return DATA / "requirements" / f"{requirements}.txt"


def read_lock(path: Path) -> dict:
    """{"pins": {name: version} without torch, "torch": version or None, "pythons": [...],
    "text": the file without its torch line (what pip installs with --no-deps)}.

    Read once per run for all hosts (again if the file changes); shared, do not modify."""
    stat = path.stat()
    return _parsed_lock(path, stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=32)
def _parsed_lock(path: Path, mtime_ns: int, size: int) -> dict:
    pins, torch, pythons, kept = {}, None, [], []
    for raw in path.read_text().splitlines():
        comment = raw.strip()
        if comment.lower().startswith("# python:"):
            pythons = [v.strip() for v in comment.split(":", 1)[1].split(",") if v.strip()]
        line = raw.split("#", 1)[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            name, version = normalize(name.split("[")[0].strip()), version.split(";")[0].strip()
            if name == "torch":
                torch = version
                continue
            pins[name] = version
        kept.append(raw)
    return {"pins": pins, "torch": torch, "pythons": pythons, "text": "\n".join(kept) + "\n"}


def tag_cuda(tag: str) -> str | None:
    """'cu121' -> '12.1', 'cu130' -> '13.0', 'cpu' -> None."""
    if tag == "cpu":
        return None
    digits = tag.removeprefix("cu")
    return f"{digits[:-1]}.{digits[-1]}"


def check_settings(s: Settings):
    """Checks of the Python settings that need no GPU plan (called by settings_for)."""
    host = s.host
    data = python_data()
    if s.python_backend not in ("conda", "venv"):
        raise SettingError(host, "python_backend", f"= {s.python_backend!r} is not supported",
                           "use 'conda' (Miniforge/Miniconda env) or 'venv' (the host's own Python)")
    path = lock_path(s.requirements)
    if "/" in s.requirements and not path.is_absolute():
        raise SettingError(host, "requirements", f"= {s.requirements!r} is a relative path",
                           "give a lock file's absolute path, or a name in data/requirements/")
    if not path.is_file():
        raise SettingError(host, "requirements", f"= {s.requirements!r} names no lock file",
                           f"use the name of a file in {DATA / 'requirements'} (without .txt) "
                           "or an absolute path")
    lock = read_lock(path)
    if not lock["pins"]:
        raise SettingError(host, "requirements", f"= {s.requirements!r} pins no package",
                           "list every package as name==version")
    if lock["torch"] is None and not s.venv_system_site_packages:
        raise SettingError(host, "requirements", f"= {s.requirements!r} has no torch pin, so it "
                           "relies on the system Python's torch, but venv_system_site_packages is False",
                           "set venv_system_site_packages=True (with python_backend='venv'), or use "
                           "a lock file that pins torch")
    if s.venv_system_site_packages and s.python_backend != "venv":
        raise SettingError(host, "venv_system_site_packages", "is True with python_backend="
                           f"{s.python_backend!r}", "set python_backend='venv' to reuse the system "
                           "Python's packages, or leave venv_system_site_packages False")
    if s.python_version and not PYVER.fullmatch(s.python_version):
        raise SettingError(host, "python_version", f"= {s.python_version!r} is not a CPython "
                           "minor version", "use e.g. '3.11', or leave it empty for the default")
    if s.python_version and s.python_backend != "conda":
        raise SettingError(host, "python_version", "only applies to python_backend='conda'",
                           "for a venv set python to the interpreter, e.g. python='python3.11'")
    if s.python_version and lock["pythons"] and s.python_version not in lock["pythons"]:
        raise SettingError(host, "python_version", f"= {s.python_version!r} is not supported by "
                           f"the lock {s.requirements!r} (wheels for Python {', '.join(lock['pythons'])})",
                           f"use one of {', '.join(lock['pythons'])}, or leave it empty")
    if not s.python.strip() or any(c.isspace() or c in "'\";&|$`" for c in s.python):
        raise SettingError(host, "python", f"= {s.python!r} is not an interpreter name or path",
                           "use e.g. 'python3' or '/usr/bin/python3.11'")

    if s.pip_index_url:
        check_url(host, "pip_index_url", s.pip_index_url, ("http", "https", "file"))
        if not urlparse(s.pip_index_url).path.rstrip("/").endswith("simple"):
            raise SettingError(host, "pip_index_url", f"= {s.pip_index_url!r} is not a PEP 503 "
                               "'simple' index URL", "use the index's .../simple/ URL, e.g. "
                               "'https://pypi.tuna.tsinghua.edu.cn/simple/'")
    if s.torch_index_url:
        try:
            sample = s.torch_index_url.format(tag="cu121")
        except (KeyError, IndexError, ValueError):
            raise SettingError(host, "torch_index_url", f"= {s.torch_index_url!r} has a "
                               "placeholder other than {tag}", "use e.g. "
                               "'https://download.pytorch.org/whl/{tag}'") from None
        check_url(host, "torch_index_url", sample, ("http", "https", "file"))
    if s.torch_version and not re.fullmatch(r"\d+\.\d+(\.\d+)?", s.torch_version):
        raise SettingError(host, "torch_version", f"= {s.torch_version!r} is not a release "
                           "number", "use e.g. '2.5.1' (the build tag is added from the resolved CUDA)")

    installers = data["conda"]["installers"]
    if s.conda_installer and s.conda_installer not in installers:
        raise SettingError(host, "conda_installer", f"= {s.conda_installer!r} is unknown",
                           f"use one of {', '.join(installers)} (data/python.toml)")
    if s.conda_installer_url:
        check_url(host, "conda_installer_url", s.conda_installer_url, ("http", "https", "file"))
    if s.conda_installer_sha256 and not HEX64.fullmatch(s.conda_installer_sha256):
        raise SettingError(host, "conda_installer_sha256", f"= {s.conda_installer_sha256!r} is "
                           "not a sha256", "use the 64 lowercase hex digits of the installer's sha256")
    if s.conda_installer_url and not s.conda_installer_sha256:
        default = installers[s.conda_installer or data["conda"]["default_installer"]]
        if _basename(s.conda_installer_url) != _basename(default["url"]):
            raise SettingError(host, "conda_installer_sha256", f"is needed: conda_installer_url "
                               f"names {_basename(s.conda_installer_url)!r}, not the pinned "
                               f"{_basename(default['url'])!r} whose sha256 is known",
                               "set conda_installer_sha256 to that file's sha256 (the release's "
                               ".sha256 file), or point the URL at a mirror of the pinned file")
    if s.conda_mirror:
        check_url(host, "conda_mirror", s.conda_mirror)
    for channel in _split(s.conda_channels):
        if not CHANNEL.fullmatch(channel):
            raise SettingError(host, "conda_channels", f"names {channel!r}, not a channel",
                               "use comma-separated channel names or URLs, e.g. 'conda-forge'")
    if s.conda_dir and (not s.conda_dir.startswith("/") or s.conda_dir.rstrip("/") in
                        ("", "/usr", "/opt", "/usr/local", "/root", "/home")):
        raise SettingError(host, "conda_dir", f"= {s.conda_dir!r} is not a directory of its own",
                           "use an absolute path the installer may own, e.g. '/opt/chatglm/conda'")


def _split(value: str) -> list[str]:
    return [p.strip() for p in value.split(",") if p.strip()]


def _basename(url: str) -> str:
    return urlparse(url).path.rstrip("/").rsplit("/", 1)[-1]


def python_plan(s: Settings, plan: GpuPlan) -> PythonPlan:
    """The environment of one host, from its settings and its GPU plan (torch_tag).

    Raises SettingError when the lock, the torch build and the Python cannot go together.
    """
    data = python_data()
    tag = plan.torch_tag
    lock = read_lock(lock_path(s.requirements))
    builds = data["torch"]["builds"]
    if tag not in builds:
        raise SettingError(s.host, "torch", f"build {tag!r} (CUDA {plan.cuda}) has no row in "
                           "data/python.toml [torch.builds]",
                           "add the release published for it, or set cuda_version to another CUDA")
    build = builds[tag]
    env = s.venv
    common = dict(
        backend=s.python_backend, install_dir=s.install_dir, env=env, python=f"{env}/bin/python",
        interpreter=s.python, system_site_packages=s.venv_system_site_packages,
        lock_name=s.requirements, lock_text=lock["text"], pins=lock["pins"],
        index=s.pip_index_url,
        trusted_host=urlparse(s.pip_index_url).hostname if s.pip_index_url.startswith("http://") else "",
        torch_tag=tag, gpu=plan.gpu, gpu_caps=sorted({g["compute_cap"] for g in plan.gpus}),
        expect_cuda=tag_cuda(tag))
    if lock["torch"] is None:
        # The system Python's torch (venv_system_site_packages): verified, never installed.
        py = PythonPlan(**common, torch=None, torch_index="", torch_deps=False, pythons=lock["pythons"])
    else:
        release = s.torch_version or (lock["torch"].split("+")[0] if tag == "cpu"
                                      else build.get("version"))
        if not release:
            raise SettingError(s.host, "torch", f"build {tag!r} names no version in "
                               "data/python.toml", "add version = '...' to its row")
        index = (s.torch_index_url or data["torch"]["index_url"]).format(tag=tag)
        pythons = [v for v in (lock["pythons"] or build["python"]) if v in build["python"]]
        if not pythons:
            raise SettingError(s.host, "requirements", f"= {s.requirements!r} supports Python "
                               f"{', '.join(lock['pythons'])}, torch {release}+{tag} only "
                               f"{', '.join(build['python'])}",
                               "use a lock file built for a Python that this torch supports")
        # CPU: the lock holds torch's dependencies. CUDA: the index's nvidia-* wheels.
        py = PythonPlan(**common, torch=f"{release}+{tag}", torch_index=index,
                        torch_deps=tag != "cpu", pythons=pythons)
    if s.python_backend != "conda":
        return py
    version = s.python_version or max(py.pythons, key=version_tuple, default="3.11")
    if version not in py.pythons and py.pythons:
        raise SettingError(s.host, "python_version", f"= {version!r} has no torch "
                           f"{py.torch} wheels", f"use one of {', '.join(py.pythons)}")
    name = s.conda_installer or data["conda"]["default_installer"]
    installer = data["conda"]["installers"][name]
    url = s.conda_installer_url or installer["url"]
    conda = CondaInstaller(
        prefix=s.conda_prefix, installer=name, url=url,
        sha256=s.conda_installer_sha256 or installer["sha256"],
        file=f"{s.install_dir}/.{_basename(url)}",
        channels=_split(s.conda_channels) or list(installer["channels"]),
        mirror=s.conda_mirror.rstrip("/"))
    return dataclasses.replace(py, python_version=version, conda=conda)
