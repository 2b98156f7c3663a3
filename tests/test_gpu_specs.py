"""Spec tests for the GPU operations (operations/gpu.py, operations/cuda_libs.py).

In the style of pyinfra's own operation tests: each file in tests/specs/gpu/ names an
operation, its arguments, the facts a fake host answers with and the exact commands the
operation must yield. The operation's undecorated generator (``op._inner``) runs with
``pyinfra.host`` and ``pyinfra.state`` bound to fakes; nothing connects anywhere.

Spec keys:
  op          "gpu.packages", "gpu.hold", "cuda_libs.expose", ...
  args        keyword arguments. "plan" is either a literal plan or
              {"resolve": {"gpus": ["H100" | {...}], "os": "ubuntu-24.04", "pins": {...},
                           "installed_driver": "580.65.06"}}
              which runs operations.resolver.resolve (plus the keys gpu_plan adds).
              "s" is a dict of host data, turned into Settings by settings_for.
  plan_expect subset the resolved plan must contain (checks the resolver on the way)
  executing   host.state.is_executing (default false)
  facts       {"module.FactClass": value} or {"module.FactClass(k=v, k2=v2)": value};
              a fact request not listed fails the test, naming it
  commands    exact list of commands: strings, {"upload": dest[, "content": text]},
              {"function": name}
  noop        true: no commands and host.noop was called; a string: also a substring
              of a noop message
  raises      the operation fails the host: it raises, or its last command is
              operations.common.fail(message); a substring (or list of substrings) of
              the exception's or the fail() message
  xfail       a known bug in the operation, described; the spec states the intended
              behaviour and fails strictly until the bug is fixed (then drop the key)
"""

import dataclasses
import inspect
import json
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
from pyinfra.context import ctx_host, ctx_state

from operations import common, cuda_libs, gpu
from operations.resolver import GpuPlan, resolve
from operations.checks import settings_for
from operations.settings import SettingError
from tests.spec_harness import FakeDataHost, FakeHost, check_spec, run_op

SPECS = Path(__file__).resolve().parent / "specs" / "gpu"
SPEC_FILES = sorted(SPECS.glob("*.json"))
HOST = "gpu-test"
MODULES = {"gpu": gpu, "cuda_libs": cuda_libs}

# GPUs a spec may name instead of spelling them out.
GPUS = {
    "H100": {"name": "NVIDIA H100 80GB HBM3", "memory_mib": 81559, "compute_cap": "9.0"},
    "A10": {"name": "NVIDIA A10", "memory_mib": 23028, "compute_cap": "8.6"},
    "A100": {"name": "NVIDIA A100-SXM4-40GB", "memory_mib": 40960, "compute_cap": "8.0"},
    "L4": {"name": "NVIDIA L4", "memory_mib": 23034, "compute_cap": "8.9"},
    "T4": {"name": "Tesla T4", "memory_mib": 15360, "compute_cap": "7.5"},
    "V100": {"name": "Tesla V100-SXM2-16GB", "memory_mib": 16384, "compute_cap": "7.0"},
}

def build_plan(spec_plan: dict) -> GpuPlan:
    if "resolve" not in spec_plan:
        return GpuPlan(**spec_plan)
    r = spec_plan["resolve"]
    gpus = [GPUS[g] if isinstance(g, str) else g for g in r.get("gpus", ["H100"])]
    installed = r.get("installed_driver", "")
    plan = resolve(HOST, gpus, r["os"], r.get("pins", {}), installed_driver=installed)
    # What gpu.gpu_plan adds to the resolver's result.
    return dataclasses.replace(plan, gpus=gpus, smi_error=r.get("smi_error", ""),
                               installed_driver=installed)


def build_args(op, spec: dict) -> tuple[dict, GpuPlan | None]:
    """The operation's keyword arguments: the spec's own, then each parameter the operation
    takes from the plan ("plan") or the host's settings ("s") of the same name."""
    given = dict(spec.get("args", {}))
    plan = build_plan(given.pop("plan")) if "plan" in given else None
    s = settings_for(FakeDataHost(HOST, given.pop("s"))) if "s" in given else None
    args = {}
    for name in inspect.signature(op._inner).parameters:
        for source in (given, plan, s):
            if isinstance(source, dict) and name in source:
                args[name] = source[name]
                break
            if source is not None and not isinstance(source, dict) and hasattr(source, name):
                args[name] = getattr(source, name)
                break
    unknown = set(given) - set(args)
    assert not unknown, f"{spec['op']} takes no {sorted(unknown)}"
    return args, plan



def run_spec(spec: dict):
    module_name, op_name = spec["op"].split(".")
    op = getattr(MODULES[module_name], op_name)
    args, plan = build_args(op, spec)
    for key, value in spec.get("plan_expect", {}).items():
        assert getattr(plan, key) == value, f"resolved plan.{key} = {getattr(plan, key)!r}"
    return run_op(op, args, HOST, spec.get("facts", {}),
                  executing=spec.get("executing", False), fail_in=MODULES.values(),
                  catch="raises" in spec)


def _param(path: Path):
    spec = json.loads(path.read_text())
    marks = [pytest.mark.xfail(reason=spec["xfail"], strict=True)] if "xfail" in spec else []
    return pytest.param(path, id=path.stem, marks=marks)


@pytest.mark.parametrize("path", [_param(p) for p in SPEC_FILES])
def test_spec(path):
    spec = json.loads(path.read_text())
    check_spec(spec, *run_spec(spec))


def _gpu_plan(facts: dict, os_id: str = "ubuntu-24.04", **data) -> dict:
    state = SimpleNamespace(is_executing=False, config=SimpleNamespace(DIFF=False))
    fake = FakeHost(HOST, facts, state)
    with ctx_state.use(state), ctx_host.use(fake):
        return gpu.gpu_plan(settings_for(FakeDataHost(HOST, data)), os_id)


SMI_NONE = {"gpus": [], "driver": "", "error": "", "installed": False}


def test_gpu_plan_from_nvidia_smi():
    smi = {"gpus": [GPUS["H100"]], "driver": "580.82.07", "error": "", "installed": True}
    plan = _gpu_plan({"gpu.NvidiaPciDevices": [{"pci": "0000:01:00.0", "device": "0x2330"}],
                      "gpu.NvidiaSmi": smi, "gpu.DriverLibraries": []})
    assert (plan.cuda, plan.keep_driver, plan.driver_branch) == ("13.0", True, "580")
    assert plan.installed_driver == "580.82.07" and plan.gpus == [GPUS["H100"]]


def test_gpu_plan_from_the_pci_table_before_any_driver():
    plan = _gpu_plan({"gpu.NvidiaPciDevices": [{"pci": "0000:01:00.0", "device": "0x2330"}],
                      "gpu.NvidiaSmi": SMI_NONE, "gpu.DriverLibraries": []}, "debian-12")
    assert plan.gpus[0]["compute_cap"] == "9.0"
    assert (plan.cuda, plan.keep_driver, plan.repo_distro) == ("13.0", False, "debian12")


def test_gpu_plan_version_mismatch_uses_the_libraries_version():
    smi = {"gpus": [], "driver": "", "installed": True,
           "error": "Failed to initialize NVML: Driver/library version mismatch"}
    libs = [{"link": "/usr/lib/x86_64-linux-gnu/libcuda.so.1",
             "path": "/usr/lib/x86_64-linux-gnu/libcuda.so.580.82.07", "version": "580.82.07"}]
    plan = _gpu_plan({"gpu.NvidiaPciDevices": [{"pci": "0000:01:00.0", "device": "0x2330"}],
                      "gpu.NvidiaSmi": smi, "gpu.DriverLibraries": libs})
    assert plan.installed_driver == "580.82.07" and plan.keep_driver is True
    assert "mismatch" in plan.smi_error


def test_gpu_plan_unknown_pci_id_needs_compute_cap():
    facts = {"gpu.NvidiaPciDevices": [{"pci": "0000:01:00.0", "device": "0xffff"}],
             "gpu.NvidiaSmi": SMI_NONE, "gpu.DriverLibraries": []}
    with pytest.raises(SettingError) as info:
        _gpu_plan(facts)
    assert all(t in str(info.value) for t in (HOST, "gpu_compute_cap", "0xffff", "Fix:"))
    plan = _gpu_plan(facts, gpu_compute_cap="8.6", gpu_memory_mib=23028)
    assert plan.gpus[0]["compute_cap"] == "8.6" and plan.gpus[0]["memory_mib"] == 23028


def test_gpu_plan_cpu_only():
    plan = _gpu_plan({"gpu.NvidiaPciDevices": [], "gpu.NvidiaSmi": SMI_NONE,
                      "gpu.DriverLibraries": []}, "centos-7")
    assert plan.gpu is False and plan.torch_tag == "cpu"


def test_fail_command_fails_with_its_message():
    """The real fail(): a shell command that prints the message and exits 1."""
    message = "it's \"quoted\" $(not run) `nor this`; Fix: nothing"
    command = common.fail(message).get_raw_value()
    proc = subprocess.run(["sh", "-c", command], capture_output=True, text=True, timeout=5)
    assert proc.returncode == 1
    assert proc.stderr.strip() == "ERROR: " + message


def test_specs_exist():
    assert len(SPEC_FILES) >= 30, SPEC_FILES


def test_every_operation_has_specs():
    """Each operation the GPU stage runs (report_plan only logs) is covered by specs."""
    ops = {json.loads(p.read_text())["op"] for p in SPEC_FILES}
    wanted = {"gpu.secure_boot", "gpu.cuda_repo", "gpu.nouveau", "gpu.packages", "gpu.hold",
              "gpu.cuda_link", "gpu.module", "cuda_libs.expose", "cuda_libs.check"}
    assert wanted <= ops, sorted(wanted - ops)


def test_every_spec_is_well_formed():
    allowed = {"op", "description", "args", "plan_expect", "executing", "facts", "commands",
               "noop", "raises", "xfail"}
    for path in SPEC_FILES:
        spec = json.loads(path.read_text())
        assert set(spec) <= allowed, (path.name, set(spec) - allowed)
        assert "op" in spec, path.name
        assert sum(k in spec for k in ("commands", "noop", "raises")) >= 1, path.name
        assert not ("noop" in spec and "commands" in spec), path.name
