"""GPU architecture -> CUDA -> driver branch -> cuDNN -> torch build, from data/compat.toml.

Pure functions: facts in, a plan out, SettingError for impossible combinations.
"""

from dataclasses import dataclass, field

from .settings import SettingError, load_toml


@dataclass
class GpuPlan:
    """One host's GPU stack: what resolve() chose from data/compat.toml, and what gpu_plan
    saw on the host. A CPU-only host has gpu False and torch_tag 'cpu', nothing else."""

    gpu: bool = False
    torch_tag: str = "cpu"     # PyTorch's wheel index tag: cpu, cu118, cu121, ...
    cuda: str = ""             # the toolkit, e.g. '12.4'
    min_driver: str = ""       # the oldest driver that toolkit runs on
    driver_branch: str = ""    # the driver to install, or the kept driver's branch
    keep_driver: bool = False  # the installed driver already satisfies the toolkit
    cudnn: str = "none"        # the cuDNN package (name or name=version), 'none' for none
    repo_distro: str = ""      # NVIDIA's repo directory for the OS, e.g. 'ubuntu2404'
    gpus: list[dict] = field(default_factory=list)  # [{"name", "memory_mib", "compute_cap"}]
    smi_error: str = ""        # nvidia-smi's message when it fails
    installed_driver: str = ""  # the installed driver's full version, '' when none

    def summary(self) -> str:
        if not self.gpu:
            return "no NVIDIA GPU found: CPU-only host, GPU stack skipped, torch build 'cpu'"
        return (f"GPU {self.gpus[0]['name']}: CUDA {self.cuda}, driver branch {self.driver_branch}"
                f"{' (kept)' if self.keep_driver else ''}, {self.cudnn}, torch {self.torch_tag}")


def version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in version.split(".") if p.isdigit())


def resolve(host: str, gpus: list[dict], os_id: str, pins: dict,
            installed_driver: str = "") -> GpuPlan:
    """Plan the GPU stack for one host.

    + host: host name, for error messages
    + gpus: [{"name", "memory_mib", "compute_cap"}], empty for CPU-only hosts
    + os_id: e.g. 'ubuntu-22.04', 'debian-12'
    + pins: cuda_version, driver_branch, cudnn from host data ('' = resolve)
    + installed_driver: full version of the userspace driver already installed
    """
    compat = load_toml("compat.toml")
    if not gpus:
        return GpuPlan()
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
    # The newest toolkit of the OS whose CUDA and torch build run on every GPU of the host.
    fits = [c for c in sorted(os_row["cudas"], key=version_tuple, reverse=True)
            if c in compat["cuda"] and not _misfit(compat, c, gpus)]
    cuda = pins.get("cuda_version")
    if not cuda:
        if not fits:
            raise SettingError(host, "os", f"{os_id!r} packages CUDA {', '.join(os_row['cudas'])}, "
                               f"none of which runs on every GPU here: "
                               f"{_misfit(compat, newest, gpus)}",
                               "install these GPUs in a host whose OS release packages a CUDA "
                               "that runs on all of them")
        cuda = fits[0]
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
    misfit = _misfit(compat, cuda, gpus)
    if misfit:
        better = (f"set cuda_version to {fits[0]}, the newest that runs here, or leave it unset"
                  if fits else "no CUDA packaged for this OS runs on these GPUs")
        raise SettingError(host, "cuda_version", f"= {cuda!r} cannot run here: {misfit}", better)
    row = compat["cuda"][cuda]

    branch = str(pins.get("driver_branch") or row["branch"])
    if version_tuple(branch) < version_tuple(row["min_driver"])[:1]:
        raise SettingError(host, "driver_branch", f"= {branch!r} is older than CUDA {cuda} needs "
                           f"(>= {row['min_driver']})",
                           f"set driver_branch to {row['branch']} or newer, or leave it unset")

    keep = bool(installed_driver) and version_tuple(installed_driver) >= version_tuple(row["min_driver"])
    return GpuPlan(gpu=True, cuda=cuda, min_driver=row["min_driver"],
                   driver_branch=installed_driver.split(".")[0] if keep else branch,
                   keep_driver=keep, cudnn=pins.get("cudnn") or row["cudnn"],
                   torch_tag=row["torch_tag"], repo_distro=os_row["repo"])


def runs_on(archs: list[str], compute_cap: str) -> bool:
    """Whether a build carrying machine code for archs runs on a GPU of compute_cap: code
    for X.Y runs on X.Z when Z >= Y (same major), never across majors."""
    major, minor = version_tuple(compute_cap)[:2]
    return any(version_tuple(a)[0] == major and version_tuple(a)[1] <= minor for a in archs)


def runs_on_arch_list(arch_list: list[str] | None, compute_cap: str) -> bool:
    """Whether torch.cuda.get_arch_list() (['sm_70', ..., 'compute_90']) runs on a GPU of
    compute_cap: machine code as runs_on says, PTX (compute_XY) on XY and anything newer.
    None (a torch too old to say) is taken as running."""
    if arch_list is None:
        return True
    code = [f"{a[3:-1]}.{a[-1]}" for a in arch_list if a.startswith("sm_")]
    ptx = [f"{a[8:-1]}.{a[-1]}" for a in arch_list if a.startswith("compute_")]
    return runs_on(code, compute_cap) or any(
        version_tuple(p) <= version_tuple(compute_cap) for p in ptx)


def _misfit(compat: dict, cuda: str, gpus: list[dict]) -> str:
    """Why CUDA cuda (its toolkit or its torch build) cannot run on one of gpus; '' if it can."""
    builds = load_toml("python.toml")["torch"]["builds"]
    tag = compat["cuda"][cuda]["torch_tag"]
    build = builds.get(tag, {})
    for gpu in gpus:
        arch = compat["arch"][gpu["compute_cap"]]
        top = arch.get("max_cuda")
        if top and version_tuple(cuda) > version_tuple(top):
            return (f"CUDA {cuda} no longer supports {gpu['name']} (compute capability "
                    f"{gpu['compute_cap']}, {arch['name']}: CUDA {top} at most)")
        if "archs" in build and not runs_on(build["archs"], gpu["compute_cap"]):
            return (f"torch {build['version']}+{tag} carries no kernels for {gpu['name']} "
                    f"(compute capability {gpu['compute_cap']}; it carries "
                    f"{', '.join(build['archs'])})")
    return ""
