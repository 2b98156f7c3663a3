"""Per-host settings: defaults, data files, and validation before any host is touched.

Every key here may be set in an inventory's host or group data; inventories/gpu.py
documents each one with its default.
"""

import difflib
import functools
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path
from urllib.parse import urlparse

from pyinfra.api.exceptions import PyinfraError

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "data"
VARIANTS = ("fp16", "int8", "int4")
# Beside what a check covers (a model's weights, an environment), the record that it passed.
VERIFIED = ".chatglm-verified"
STAGES = ("gpu", "system", "python", "cuda_libs", "model", "kernel", "smoke", "serve")
# Stages that work on the model checkout the model stage resolves (variant, revision, path).
NEEDS_MODEL = {
    "kernel": "the kernel stage builds and patches the checkout that stage resolves",
    "smoke": "the smoke stage loads the model that stage resolves and checks",
    "serve": "the serve stage serves the model that stage resolves and checks",
}


class SettingError(PyinfraError):
    """Bad inventory data: names the host, the setting and the fix."""

    def __init__(self, host: str, setting: str, problem: str, fix: str):
        super().__init__(f"host {host!r}: setting {setting!r} {problem.rstrip('.')}. Fix: {fix}")


def load_toml(name: str) -> dict:
    """A data/ file, parsed once per run for all hosts (again if the file changes); the
    dict is shared: read it, do not modify it."""
    path = DATA / name
    stat = path.stat()
    return _parsed_toml(path, stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=32)
def _parsed_toml(path: Path, mtime_ns: int, size: int) -> dict:
    with open(path, "rb") as f:
        return tomllib.load(f)


@dataclass(frozen=True)
class Settings:
    host: str
    variant: str = "auto"
    install_dir: str = "/opt/chatglm"
    python_backend: str = "conda"
    python: str = "python3"
    python_version: str = ""
    requirements: str = "chatglm-cpu"
    pip_index_url: str = ""
    torch_index_url: str = ""
    torch_version: str = ""
    venv_system_site_packages: bool = False
    conda_dir: str = ""
    conda_installer: str = ""
    conda_installer_url: str = ""
    conda_installer_sha256: str = ""
    conda_channels: str = ""
    conda_mirror: str = ""
    code_url: str = ""
    code_revision: str = ""
    model_url: str = ""
    model_revision: str = ""
    model_revisions: dict = None
    allow_floating_revision: bool = False
    check_revisions: bool = True
    check_sources: bool = True
    weights_mode: str = "control"
    weights_share: str = ""
    seafile_url: str = ""
    weights_share_path: str = ""
    weights_mirror: str = ""
    weights_cache: str = "~/.cache/chatglm-deploy"
    weights_attempts: int = 6
    weights_transfer: str = "push"
    weights_swarm_address: str = ""
    cuda_version: str = ""
    driver_branch: str = ""
    cudnn: str = ""
    gpu_compute_cap: str = ""
    gpu_memory_mib: int = 0
    kernel_headers: bool = True
    build_gpu_kernels: bool = True
    check_memory: bool = True
    secure_boot_module_signed: bool = False
    stages: str = "all"
    cuda_repo_url: str = "https://developer.download.nvidia.com/compute/cuda/repos"
    allow_reboot: bool = False
    smoke_test: bool = True
    batch_facts: bool = True
    smoke_max_new_tokens: int = 64
    report_dir: str = "reports"
    serve_host: str = "127.0.0.1"
    serve_port: int = 8000
    serve_api_key: str = ""
    serve_queue: int = 32
    serve_max_batch: int = 8
    serve_max_prompt_tokens: int = 1536
    serve_max_tokens: int = 512
    serve_backend: str = "auto"
    serve_drain_s: int = 30
    serve_threads: int = 0
    serve_ready_timeout_s: int = 600
    serve_user: str = "chatglm"

    @property
    def stage_list(self) -> list[str]:
        if self.stages == "all":
            return list(STAGES)
        return [p.strip() for p in self.stages.split(",") if p.strip()]

    @property
    def venv(self) -> str:
        """The Python environment's prefix (its bin/python runs the model), either backend."""
        if self.python_backend == "conda":
            return f"{self.conda_prefix}/envs/chatglm"
        return f"{self.install_dir}/venv"

    @property
    def conda_prefix(self) -> str:
        return self.conda_dir.rstrip("/") or f"{self.install_dir}/conda"

    @property
    def code_dir(self) -> str:
        return f"{self.install_dir}/ChatGLM-6B"

    def model_dir(self, variant: str) -> str:
        return f"{self.install_dir}/models/{load_toml('models.toml')['variants'][variant]['name']}"


def is_commit(rev: str) -> bool:
    return len(rev) == 40 and all(c in "0123456789abcdef" for c in rev)


def check_url(host: str, setting: str, value: str, schemes=("http", "https", "git", "file")):
    """value is a full URL of one of schemes, or SettingError names host, setting and fix."""
    parsed = urlparse(value)
    if parsed.scheme not in schemes or (parsed.scheme != "file" and not parsed.netloc) \
            or any(c.isspace() for c in value):
        raise SettingError(host, setting, f"= {value!r} is not a valid URL",
                           f"use a full URL such as 'https://mirror.example/path/' ({'/'.join(schemes)})")


@functools.cache
def pyinfra_keys() -> frozenset[str]:
    """Host-data keys pyinfra itself reads: its connectors' settings and the global
    arguments (`_sudo`, ...) a host's data may default."""
    from pyinfra.api.arguments import all_global_arguments
    from pyinfra.api.connectors import get_all_connectors

    keys = {name for name, _ in all_global_arguments() if name.startswith("_")}
    for connector in get_all_connectors().values():
        keys.update(getattr(connector, "data_meta", None) or {})
    return frozenset(keys)


def check_keys(host_name: str, data: dict) -> None:
    """A key that is neither a setting of this deploy nor one of pyinfra's would be ignored
    silently (a misspelt 'varient' deploys the default): stop the run instead."""
    known = [f.name for f in fields(Settings) if f.name != "host"]
    for key in sorted(data):
        if key in known or key in pyinfra_keys():
            continue
        near = difflib.get_close_matches(key, known + sorted(pyinfra_keys()), n=1, cutoff=0.6)
        raise SettingError(host_name, key, "is not a setting of this deploy nor one of pyinfra's",
                           f"did you mean {near[0]!r}? (every setting: inventories/gpu.py)" if near
                           else "remove it, or see inventories/gpu.py for every setting")


def read_settings(host) -> Settings:
    """Build one host's settings from its data, checking the settings every stage reads;
    raise SettingError. (checks.settings_for adds the Python and serve stages' checks.)"""
    # pyinfra's HostData merges host, group and --data values; tests pass a plain dict.
    check_keys(host.name, host.data.dict() if hasattr(host.data, "dict") else host.data)
    known = {f.name: f for f in fields(Settings) if f.name != "host"}
    values = {}
    for name, field in known.items():
        value = host.data.get(name)
        if value is None:
            continue
        expected = type(field.default)
        if field.default is None:
            if not isinstance(value, dict):
                raise SettingError(host.name, name, f"= {value!r} is not a mapping",
                                   f"set {name} to a dict such as {{'int4': '<commit>'}}")
            values[name] = value
            continue
        if expected is bool and not isinstance(value, bool):
            raise SettingError(host.name, name, f"= {value!r} is not true/false",
                               f"set {name}=True or {name}=False")
        if expected is int and (not isinstance(value, int) or isinstance(value, bool)):
            raise SettingError(host.name, name, f"= {value!r} is not a number", f"set {name} to an integer")
        values[name] = expected(value) if expected is str else value
    s = Settings(host=host.name, **values)

    if s.variant not in (*VARIANTS, "auto"):
        raise SettingError(host.name, "variant", f"= {s.variant!r} is unknown",
                           "use one of 'fp16', 'int8', 'int4' or 'auto'")
    unknown = set(s.stage_list) - set(STAGES)
    if unknown:
        raise SettingError(host.name, "stages", f"names unknown stages {sorted(unknown)}",
                           f"use 'all' or a comma-separated list of {', '.join(STAGES)}")
    if not s.stage_list:
        raise SettingError(host.name, "stages", "is empty", "use 'all' or name the stages to run")
    for stage, why in NEEDS_MODEL.items():
        if stage in s.stage_list and "model" not in s.stage_list:
            raise SettingError(host.name, "stages", f"= {s.stages!r} runs {stage!r} without 'model'",
                               f"add 'model' to stages: {why} (a converged model stage changes "
                               "nothing)")
    if s.weights_mode not in ("control", "direct", "mirror"):
        raise SettingError(host.name, "weights_mode", f"= {s.weights_mode!r} is unknown",
                           "use 'control', 'direct' or 'mirror'")
    if s.weights_attempts < 1:
        raise SettingError(host.name, "weights_attempts", f"= {s.weights_attempts} is below 1",
                           "set it to the tries in a row without progress before giving up (6)")
    if s.weights_mode == "mirror" and not s.weights_mirror:
        raise SettingError(host.name, "weights_mirror", "is empty while weights_mode='mirror'",
                           "set weights_mirror to the LAN HTTP URL holding the weight files")
    for name in ("weights_share", "seafile_url", "weights_mirror", "code_url", "model_url",
                 "cuda_repo_url"):
        if getattr(s, name):
            check_url(host.name, name, getattr(s, name),
                       ("http", "https") if name == "weights_mirror" else ("http", "https", "git", "file"))
    if not s.install_dir.startswith("/"):
        raise SettingError(host.name, "install_dir", f"= {s.install_dir!r} is not absolute",
                           "use an absolute path such as '/opt/chatglm'")
    check_paths(s)
    return s


PATH_SETTINGS = ("install_dir", "conda_dir", "weights_cache", "report_dir")


def check_paths(s: Settings) -> None:
    """Paths are quoted wherever they reach a shell, so spaces, quotes, $, * and the like
    work; refused are what cannot: a control character (a newline ends a fact's line of
    output, a command's too), a backslash (written into Python and ini files as it is),
    and whitespace in the conda prefix (conda's installer refuses it)."""
    for name in PATH_SETTINGS:
        value = getattr(s, name)
        bad = sorted({c for c in value if ord(c) < 32 or ord(c) == 127 or c == "\\"})
        if bad:
            raise SettingError(s.host, name, f"= {value!r} contains {', '.join(map(repr, bad))}",
                               "use a path without control characters or backslashes")
    if s.python_backend == "conda" and any(c.isspace() for c in s.conda_prefix):
        name = "conda_dir" if s.conda_dir else "install_dir"
        raise SettingError(s.host, name, f"= {getattr(s, name)!r} puts conda in {s.conda_prefix!r}, "
                           "a path with a space, where conda's installer refuses to install",
                           "set conda_dir to a path without spaces (such as '/opt/conda-chatglm'), "
                           "or use python_backend='venv'")


def mirror_url(mirror: str, name: str) -> str:
    """The folder of a model's files on a LAN mirror: '{name}' in weights_mirror becomes the
    model repo's name (chatglm-6b-int4 ...), else the files are under <weights_mirror>/<name>/."""
    url = mirror.format(name=name) if "{name}" in mirror else f"{mirror.rstrip('/')}/{name}"
    return url.rstrip("/") + "/"


def revision_setting(s: Settings, key: str, variant: str) -> str:
    """The name of the setting a revision came from, for messages."""
    if key == "model_revision" and (s.model_revisions or {}).get(variant):
        return f"model_revisions[{variant!r}]"
    return key if getattr(s, key) else f"{key} (data/models.toml)"


def source_for(s: Settings, variant: str) -> dict:
    """The code and model repo, revision and share of a variant, host settings first."""
    models = load_toml("models.toml")
    v = models["variants"][variant]
    src = {
        "code_url": s.code_url or models["code"]["url"],
        "code_revision": s.code_revision or models["code"]["revision"],
        "model_url": s.model_url.format(name=v["name"]) if s.model_url else v["url"],
        "model_revision": (s.model_revisions or {}).get(variant) or s.model_revision
        or v["revision"],
        "share": s.weights_share or (
            s.seafile_url.rstrip("/") + urlparse(v["share"]).path if s.seafile_url else v["share"]),
        "share_path": s.weights_share_path.format(name=v["name"]) if s.weights_share_path
        else v["share_path"],
        "name": v["name"],
    }
    if s.weights_mirror:
        src["mirror"] = mirror_url(s.weights_mirror, v["name"])
    src["settings"] = {"code_revision": revision_setting(s, "code_revision", variant),
                       "model_revision": revision_setting(s, "model_revision", variant),
                       "share": "weights_share" if s.weights_share else
                       "seafile_url" if s.seafile_url else "weights_share (data/models.toml)",
                       "folder": "weights_share_path" if s.weights_share_path
                       else "weights_share_path (data/models.toml)"}
    # The published sha256 of the weights hold only for the default commit they came with.
    src["reviewed"] = v.get("reviewed_sha256", {}) if src["model_revision"] == v["revision"] else {}
    for key in ("code_revision", "model_revision"):
        rev = src[key]
        if not is_commit(rev) and not s.allow_floating_revision:
            setting = src["settings"][key]
            raise SettingError(
                s.host, setting, f"= {rev!r} is not a pinned commit",
                "set it to a reviewed 40-hex commit (git ls-remote URL shows them), or set "
                "allow_floating_revision=True to accept a branch or tag: this code runs with "
                "trust_remote_code")
    return src
