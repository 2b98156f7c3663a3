"""GPU architecture -> CUDA -> driver branch -> cuDNN -> torch build, from data/compat.toml.

Pure functions: facts in, a plan out, SettingError for impossible combinations.
"""

from .settings import SettingError, load_toml


def version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in version.split(".") if p.isdigit())


def os_key(distro: dict) -> str:
    """'ubuntu-22.04' / 'debian-12' from pyinfra's LinuxDistribution fact."""
    ident = (distro.get("release_meta") or {}).get("ID", distro.get("name", "")).lower()
    major = distro.get("major")
    minor = distro.get("minor")
    if ident == "ubuntu":
        return f"ubuntu-{major}.{minor:02d}" if minor is not None else f"ubuntu-{major}"
    return f"{ident}-{major}"


def resolve(host: str, gpus: list[dict], os_id: str, pins: dict,
            installed_driver: str = "") -> dict:
    """Plan the GPU stack for one host.

    + host: host name, for error messages
    + gpus: [{"name", "memory_mib", "compute_cap"}], empty for CPU-only hosts
    + os_id: e.g. 'ubuntu-22.04', 'debian-12'
    + pins: cuda_version, driver_branch, cudnn from host data ('' = resolve)
    + installed_driver: full version of the userspace driver already installed
    """
    compat = load_toml("compat.toml")
    if not gpus:
        return {"gpu": False, "torch_tag": "cpu"}
    if os_id not in compat["os"]:
        raise SettingError(host, "os", f"{os_id!r} is not supported for the GPU stack",
                           f"use one of {', '.join(compat['os'])}")
    os_row = compat["os"][os_id]

    need = "0"
    for gpu in gpus:
        arch = compat["arch"].get(gpu["compute_cap"])
        if arch is None:
            raise SettingError(host, "gpu", f"compute capability {gpu['compute_cap']} of "
                               f"{gpu['name']} is not in data/compat.toml",
                               "add the architecture to data/compat.toml [arch]")
        if version_tuple(arch["min_cuda"]) > version_tuple(need):
            need, need_gpu = arch["min_cuda"], gpu

    newest = max(os_row["cudas"], key=version_tuple)
    if version_tuple(newest) < version_tuple(need):
        raise SettingError(host, "os", f"{os_id!r} carries CUDA up to {newest}, too old for "
                           f"{need_gpu['name']} (compute capability {need_gpu['compute_cap']} "
                           f"needs CUDA >= {need})",
                           "install this GPU in a host with a newer OS release")
    cuda = pins.get("cuda_version") or os_row["default_cuda"]
    if cuda not in compat["cuda"]:
        raise SettingError(host, "cuda_version", f"= {cuda!r} is unknown",
                           f"use one of {', '.join(compat['cuda'])}")
    if version_tuple(cuda) < version_tuple(need):
        raise SettingError(host, "cuda_version", f"= {cuda!r} is too old for {need_gpu['name']} "
                           f"(compute capability {need_gpu['compute_cap']} needs CUDA >= {need})",
                           f"set cuda_version to {need} or newer, or leave it unset")
    if cuda not in os_row["cudas"]:
        raise SettingError(host, "cuda_version", f"= {cuda!r} is not packaged for {os_id}",
                           f"use one of {', '.join(os_row['cudas'])}")
    row = compat["cuda"][cuda]

    branch = str(pins.get("driver_branch") or row["branch"])
    if version_tuple(branch) < version_tuple(row["min_driver"])[:1]:
        raise SettingError(host, "driver_branch", f"= {branch!r} is older than CUDA {cuda} needs "
                           f"(>= {row['min_driver']})",
                           f"set driver_branch to {row['branch']} or newer, or leave it unset")

    keep = bool(installed_driver) and version_tuple(installed_driver) >= version_tuple(row["min_driver"])
    return {
        "gpu": True,
        "cuda": cuda,
        "min_driver": row["min_driver"],
        "driver_branch": installed_driver.split(".")[0] if keep else branch,
        "keep_driver": keep,
        "cudnn": pins.get("cudnn") or row["cudnn"],
        "torch_tag": row["torch_tag"],
        "repo_distro": os_row["repo"],
    }
