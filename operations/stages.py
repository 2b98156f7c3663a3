"""The deploy's stages, each a pyinfra deploy (@deploy): deploy.py calls them in order.

A stage's operations are named "<stage> | <operation>" in pyinfra's output. Everything a
stage needs to decide is read before any host changes: begin() checks every host's
settings once per run, detect() and plan() read each host's GPUs, memory and upstreams.
A stage that works on the model checkout needs the model stage beside it
(settings.NEEDS_MODEL): selecting it alone stops the run before any host is touched.
"""

from dataclasses import dataclass
from pathlib import Path

from pyinfra import host, logger, state
from pyinfra.api import deploy
from pyinfra.api.operation import OperationMeta

from facts.system import HostResources

from . import (cuda_libs, factcache, gpu, gpu_kernels, hostlock, kernel, model, preflight, pyenv,
               pyplan, runstate, serve, smoke, swarm, system, tuning)
from .checks import settings_for
from .pyplan import PythonPlan
from .report import FleetReport, stop_on_signals
from .resolver import GpuPlan
from .settings import ROOT, Settings, source_for


@dataclass
class HostPlan:
    """What one host gets, decided before any change: its GPU stack, the model variant and
    where its code and weights come from (model stage), its Python env (Python stage)."""

    gpu: GpuPlan
    variant: str = ""
    model_dir: str = ""
    source: dict | None = None     # settings.source_for: URLs, revisions, share
    resources: dict | None = None  # HostResources: cpus, ram_bytes
    python: PythonPlan | None = None

    @property
    def device(self) -> str:
        return "cuda" if self.gpu.gpu else "cpu"


def begin() -> runstate.Run:
    """Once per run, before any host's facts are read: every host's settings checked (a bad
    value stops the run with nothing touched), the fleet report, the signal handlers and
    the hosts that could not be reached."""
    run = runstate.of(state)
    if run.report is not None:
        return run
    tuning.apply(state)
    factcache.install(state)
    inventory = state.inventory
    fleet = []
    for each in inventory:
        s = settings_for(each)
        if s.variant != "auto" and "model" in s.stage_list:
            source_for(s, s.variant)
        fleet.append(s)
    # The report is written when a host brings figures back: a smoke or a serve result.
    reporting = any(wants_smoke(s) or "serve" in s.stage_list for s in fleet)
    report_dir = Path(fleet[0].report_dir)
    report_dir = report_dir if report_dir.is_absolute() else Path(state.cwd or ROOT) / report_dir
    run.report = FleetReport(report_dir, len(state.activated_hosts), reporting)
    state.add_callback_handler(run.report)
    state.add_callback_handler(hostlock.Release())
    stop_on_signals(state, run.report, hostlock.is_dry())
    info = hostlock.run_info(state)  # what a second deploy's message names
    logger.info(f"--> Deploy run {info['run']} from {info['from']}, started {info['started']}")
    for each in inventory:
        if state.is_host_in_limit(each) and each not in state.activated_hosts:
            reason = preflight.unreachable_reason(each)
            run.report.unreachable(each.name, reason)
            if "host key" in reason:  # pyinfra's own hint names ~/.ssh/known_hosts
                logger.error(f"[{each.name}] {reason}")
    return run


def end() -> None:
    """After this host's operations are collected: facts served from the run's first
    command are read live once the host's first change runs."""
    runstate.of(state).facts.watch(state, host)


@deploy("Host")
def lock(s: Settings) -> bool:
    """The run's first command on the host takes its deploy lock and reads the facts it
    read last run; False when another deploy holds the host (its only operation then
    stops it)."""
    facts = runstate.of(state).facts

    def first_command(prelude: str) -> list[str]:
        plan_file = factcache.plan_path(s.weights_cache, host) if s.batch_facts else None
        facts.prefetch(state, host, plan_file, prelude)
        return facts.prelude.get(host.name, [])

    taken = hostlock.take(state, host, first_command)
    hostlock.hold(name="one deploy at a time (lock)", lock=taken)
    return taken["state"] != "busy" or taken["dry"]


@deploy("GPU")
def detect(s: Settings) -> GpuPlan:
    """The host's OS and GPUs, and the GPU stack resolved for them (every host, before any
    change: a stack that cannot work stops the run)."""
    plan = gpu.gpu_plan(s, system.check_supported())
    gpu.report_plan(name="detect and resolve the stack", summary=plan.summary())
    return plan


def plan(s: Settings, gpu_plan: GpuPlan) -> HostPlan:
    """What this host gets, checked before any host is touched: memory for the variant, the
    Python plan, every upstream the host will fetch from."""
    hp = HostPlan(gpu=gpu_plan)
    if "model" in s.stage_list:
        hp.resources = host.get_fact(HostResources)  # once, for the model and kernel stages
        ram = hp.resources["ram_bytes"]
        hp.variant = model.auto_variant(gpu_plan, ram) if s.variant == "auto" else s.variant
        model.check_memory(s, hp.variant, gpu_plan, ram)
        hp.source = source_for(s, hp.variant)
        hp.model_dir = s.model_dir(hp.variant)
    if "python" in s.stage_list:
        hp.python = pyplan.python_plan(s, gpu_plan)
    preflight.check_sources(host.name, s, hp.source, hp.python)
    return hp


@deploy("Model")
def disk(s: Settings, hp: HostPlan) -> None:
    """A host short of disk for its variant fails here, before anything is installed."""
    if "model" in s.stage_list:
        model.check_resources(name="disk space", variant=hp.variant, model_dir=hp.model_dir,
                              weights_mode=s.weights_mode, weights_cache=s.weights_cache)


@deploy("Serve")
def serve_port(s: Settings) -> None:
    """A port held by another program (or no systemd) fails the host here, before any change."""
    if "serve" in s.stage_list:
        serve.check_port(name="systemd, and the port is free", s=s)


@deploy("System")
def base_system(s: Settings) -> None:
    if "system" in s.stage_list:
        system.base_packages(name="base packages",
                             extra=swarm.HOST_PACKAGES if s.weights_transfer == "swarm" else None)


@deploy("GPU")
def gpu_stack(s: Settings, hp: HostPlan) -> None:
    p = hp.gpu
    if "gpu" not in s.stage_list or not p.gpu:
        return
    stack = dict(keep_driver=p.keep_driver, driver_branch=p.driver_branch, cuda=p.cuda, cudnn=p.cudnn)
    gpu.secure_boot(name="Secure Boot check", keep_driver=p.keep_driver,
                    module_signed=s.secure_boot_module_signed)
    gpu.cuda_repo(name="NVIDIA CUDA apt repo", repo_distro=p.repo_distro,
                  cuda_repo_url=s.cuda_repo_url, **stack)
    if not p.keep_driver:
        gpu.nouveau(name="blacklist nouveau")
    gpu.packages(name="driver, CUDA toolkit, cuDNN", installed_driver=p.installed_driver,
                 kernel_headers=s.kernel_headers, **stack)
    gpu.hold(name="hold the driver, toolkit and cuDNN packages", **stack)
    gpu.cuda_link(name="/usr/local/cuda -> planned toolkit", cuda=p.cuda)
    gpu.module(name="kernel module matches driver libraries", allow_reboot=s.allow_reboot)


@deploy("Python")
def python_env(hp: HostPlan) -> list[OperationMeta]:
    """The env's operations whose change restarts the server (serve stage)."""
    py = hp.python
    if py is None:
        return []
    if py.conda:
        c = py.conda
        pyenv.conda(name="conda installed (sha256-checked), .condarc", install_dir=py.install_dir,
                    prefix=c.prefix, url=c.url, sha256=c.sha256, file=c.file, channels=c.channels,
                    mirror=c.mirror)
    pyenv.env(name="env with the planned Python, pip.conf", py=py)
    changing = [pyenv.packages(name="torch for the resolved CUDA and the pinned requirements", py=py)]
    pyenv.verify(name="verify torch/transformers/cpm_kernels", py=py)
    return changing


@deploy("CUDA libs")
def cuda_links(s: Settings, hp: HostPlan) -> None:
    if "cuda_libs" not in s.stage_list or not hp.gpu.gpu:
        return
    cuda_libs.expose(name="link where cpm_kernels looks")
    cuda_libs.check(name="cpm_kernels' own lookup",
                    python=hp.python.python if hp.python else s.python)


@deploy("Model")
def model_files(s: Settings, hp: HostPlan) -> list[OperationMeta]:
    """The code and model checkouts and the weights; returns the operations whose change
    means the server must restart."""
    if "model" not in s.stage_list:
        return []
    src = hp.source
    model.clone(name="clone ChatGLM-6B code", url=src["code_url"], dest=s.code_dir,
                revision=src["code_revision"], allow_floating=s.allow_floating_revision)
    return [
        model.clone(name="clone the model repo", url=src["model_url"], dest=hp.model_dir,
                    revision=src["model_revision"], allow_floating=s.allow_floating_revision),
        model.weights(name="weights", s=s, model_dir=hp.model_dir, share=src["share"],
                      share_path=src["share_path"], mirror=src.get("mirror", "")),
    ]


@deploy("Kernel")
def kernels(s: Settings, hp: HostPlan) -> list[OperationMeta]:
    """The quantization kernels of an int4/int8 model; returns the operations whose change
    means the server must restart."""
    if "kernel" not in s.stage_list or hp.variant not in ("int4", "int8"):
        return []
    cpus = hp.resources["cpus"]
    changing = [
        kernel.build(name="build the CPU quantization kernel", model_dir=hp.model_dir, cpus=cpus),
        kernel.patch_quantization(name="patch quantization.py", model_dir=hp.model_dir, cpus=cpus),
    ]
    caps = gpu_kernels.needs_own_kernels(hp.gpu)
    if caps and s.build_gpu_kernels:
        changing.append(gpu_kernels.build(name="build GPU kernels for this GPU",
                                          model_dir=hp.model_dir, caps=caps))
        changing.append(gpu_kernels.patch(name="quantization.py loads the GPU kernels",
                                          model_dir=hp.model_dir, caps=caps))
    return changing


def wants_smoke(s: Settings) -> bool:
    return "smoke" in s.stage_list and s.smoke_test


@deploy("Smoke")
def smoke_test(s: Settings, hp: HostPlan) -> None:
    """The in-process chat test, for hosts that do not serve: a served host holds the same
    conversation with its service (Serve stage), so that what is verified is what clients use."""
    if not wants_smoke(s) or "serve" in s.stage_list:
        return
    smoke.run(name="chat test", install_dir=s.install_dir, python=f"{s.venv}/bin/python",
              requirements=s.requirements, max_new_tokens=s.smoke_max_new_tokens,
              variant=hp.variant, model_dir=hp.model_dir, revision=hp.source["model_revision"],
              device=hp.device)
    smoke.fetch(name="fetch result", install_dir=s.install_dir,
                local_dir=str(runstate.of(state).report.report_dir / "hosts"))


@deploy("Serve")
def serving(s: Settings, hp: HostPlan, changing: list[OperationMeta]) -> None:
    """The chat server as a systemd service. changing: this run's operations whose change
    means the service must restart (the model, its kernels, the env)."""
    if "serve" not in s.stage_list:
        return
    report_dir = runstate.of(state).report.report_dir
    where = dict(variant=hp.variant, model_dir=hp.model_dir, revision=hp.source["model_revision"],
                 device=hp.device)
    serve.install(name="user and server code", s=s)
    if hp.device == "cuda" and s.serve_backend != "stream_chat":
        bits = {"int4": 4, "int8": 8}.get(hp.variant, 0)
        torch = hp.python.torch if hp.python else None
        caps = [g["compute_cap"] for g in hp.gpu.gpus]
        serve.warm_kernels(name="the engine's GPU kernels for this GPU and model", install_dir=s.install_dir,
                           python=f"{s.venv}/bin/python", user=s.serve_user, config=f"{hp.model_dir}/config.json",
                           bits=bits, key=serve.warm_key(bits, hp.source["model_revision"], torch, caps))
    serve.config(name="config", s=s, **where)
    serve.unit(name="systemd unit", s=s, **where)
    serve.api_key(name="API key", s=s)
    planned = serve.planned_fingerprint(s, **where)
    # What the host has when the service starts is not what the facts read at the start of
    # the run saw when one of those operations changes something.
    restart = any(op.will_change for op in changing)
    serve.service(name="service enabled, running what is deployed", s=s,
                  fingerprint=planned["fingerprint"], unit_sha1=planned["unit_sha1"],
                  model_dir=hp.model_dir, changing=restart)
    result = f"{s.install_dir}/serve/ready.json"
    serve.ready(name="ready on /health, the smoke conversation through the API", s=s,
                fingerprint=planned["fingerprint"], result_path=result, model_dir=hp.model_dir,
                changing=restart, chat=wants_smoke(s))
    serve.fetch_key(name="bring the API key back", s=s,
                    local_path=str(report_dir / "keys" / f"{host.name}.key"))
    serve.fetch_result(name="fetch result", s=s, result_path=result,
                       local_dir=str(report_dir / "serve"))
