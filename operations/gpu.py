"""GPU detection and the GPU stack plan (driver, CUDA, cuDNN, torch build)."""

from pyinfra import host
from pyinfra.api import FactBase, operation

from .resolver import resolve
from .settings import Settings

NVIDIA_VENDOR = "0x10de"


class NvidiaPciDevices(FactBase):
    """NVIDIA display/3D controllers on the PCI bus, read from sysfs (needs no lspci)."""

    def command(self):
        return ("for d in /sys/bus/pci/devices/*; do "
                f"[ \"$(cat $d/vendor 2>/dev/null)\" = {NVIDIA_VENDOR} ] || continue; "
                "case \"$(cat $d/class)\" in 0x03*) echo \"${d##*/} $(cat $d/device)\";; esac; "
                "done; true")

    @staticmethod
    def default():
        return []

    def process(self, output):
        return [dict(zip(("pci", "device"), line.split())) for line in output]


class NvidiaSmi(FactBase):
    """GPUs as the driver sees them: name, memory, compute capability, driver version.

    Returns {"gpus": [...], "driver": str, "error": str}; error holds nvidia-smi's own
    message when it is installed but fails (no kernel module, version mismatch).
    """

    def command(self):
        return ("if command -v nvidia-smi >/dev/null; then "
                "nvidia-smi --query-gpu=name,memory.total,compute_cap,driver_version "
                "--format=csv,noheader,nounits 2>&1; echo \"rc=$?\"; fi")

    @staticmethod
    def default():
        return {"gpus": [], "driver": "", "error": "", "installed": False}

    def process(self, output):
        rc = output[-1].removeprefix("rc=")
        lines = output[:-1]
        if rc != "0":
            return {"gpus": [], "driver": "", "error": " ".join(lines), "installed": True}
        gpus, driver = [], ""
        for line in lines:
            name, mem, cap, driver = [p.strip() for p in line.split(",")]
            gpus.append({"name": name, "memory_mib": int(float(mem)), "compute_cap": cap})
        return {"gpus": gpus, "driver": driver, "error": "", "installed": True}


def gpu_plan(s: Settings, os_ident: str) -> dict:
    """Detect this host's GPUs and resolve its stack; raises SettingError if impossible."""
    pci = host.get_fact(NvidiaPciDevices)
    smi = host.get_fact(NvidiaSmi)
    gpus = smi["gpus"]
    if pci and not gpus:
        # Present on the bus, not yet visible to a driver: plan from the pins alone.
        gpus = [{"name": f"NVIDIA {p['device']}", "memory_mib": 0,
                 "compute_cap": host.data.get("gpu_compute_cap", "8.0")} for p in pci]
    pins = {"cuda_version": s.cuda_version, "driver_branch": s.driver_branch, "cudnn": s.cudnn}
    plan = resolve(host.name, gpus, os_ident, pins, installed_driver=smi["driver"])
    plan["gpus"] = gpus
    plan["smi_error"] = smi["error"]
    return plan


@operation(is_idempotent=False)
def report_plan(plan: dict):
    """
    Show the resolved GPU stack in the run output; changes nothing.

    + plan: the resolver's result for this host
    """
    if not plan["gpu"]:
        host.noop("no NVIDIA GPU found: CPU-only host, GPU stack skipped, torch build 'cpu'")
    else:
        host.noop(f"GPU {plan['gpus'][0]['name']}: CUDA {plan['cuda']}, driver branch "
                  f"{plan['driver_branch']}{' (kept)' if plan['keep_driver'] else ''}, "
                  f"{plan['cudnn']}, torch {plan['torch_tag']}")
    return
    yield
