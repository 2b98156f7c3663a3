"""Take hosts to a verified, working ChatGLM-6B install.

    pyinfra inventories/gpu.py deploy.py                # apply
    pyinfra inventories/gpu.py deploy.py --dry --diff   # show every change first

pyinfra runs this file once per host to collect operations, then executes them
stage by stage across all hosts. Every host's settings are checked before any
operation runs, so bad inventory data stops the run with nothing touched.
"""

from pathlib import Path

from pyinfra import host, inventory, logger, state

from operations import (cuda_libs, factcache, gpu, gpu_kernels, hostlock, kernel, model, preflight,
                        pyenv, pyplan, serve, smoke, swarm, system, tuning)
from operations.report import FleetReport, stop_on_signals
from operations.settings import ROOT, settings_for, source_for
from operations.system import HostResources

# Every host's data is validated on the first pass, before any host's facts are read.
if not getattr(state, "chatglm_checked", False):
    tuning.apply(state)
    factcache.install(state)
    smoke_hosts = 0
    for each in inventory:
        each_settings = settings_for(each)
        if each_settings.variant != "auto" and "model" in each_settings.stage_list:
            source_for(each_settings, each_settings.variant)
        # The report is written when a host brings figures back: a smoke result or a serve result.
        smoke_hosts += ((each_settings.smoke_test and {"model", "smoke"} <= set(each_settings.stage_list))
                        or {"model", "serve"} <= set(each_settings.stage_list))
    state.chatglm_checked = True
    report_dir = Path(settings_for(next(iter(inventory))).report_dir)
    report_dir = report_dir if report_dir.is_absolute() else Path(state.cwd or ROOT) / report_dir
    state.chatglm_report = FleetReport(report_dir, len(state.activated_hosts), bool(smoke_hosts))
    state.add_callback_handler(state.chatglm_report)
    state.add_callback_handler(hostlock.Release())
    stop_on_signals(state, state.chatglm_report, hostlock.is_dry())
    run = hostlock.run_info(state)  # what a second deploy's message names
    logger.info(f"--> Deploy run {run['run']} from {run['from']}, started {run['started']}")
    for each in inventory:
        if state.is_host_in_limit(each) and each not in state.activated_hosts:
            reason = preflight.unreachable_reason(each)
            state.chatglm_report.unreachable(each.name, reason)
            if "host key" in reason:  # pyinfra's own hint names ~/.ssh/known_hosts
                logger.error(f"[{each.name}] {reason}")

s = settings_for(host)


def first_command(prelude: str) -> list[str]:
    """The run's first command on this host: prelude (the deploy lock), then the facts the
    host read last run, in one command; returns the prelude's output."""
    plan_file = factcache.plan_path(s.weights_cache, host) if s.batch_facts else None
    state.chatglm_facts.prefetch(state, host, plan_file, prelude)
    return state.chatglm_facts.prelude.get(host.name, [])


lock = hostlock.take(state, host, first_command)
hostlock.hold(name="Host: one deploy at a time (lock)", lock=lock)
# A host another deploy holds gets no operation but the one that stops it.
stages = [] if lock["state"] == "busy" and not lock["dry"] else s.stage_list
if stages:
    os_ident = system.check_supported()
    # GPU detection and the resolver run for every host before any change.
    plan = gpu.gpu_plan(s, os_ident)
    gpu.report_plan(name="GPU: detect and resolve the stack", plan=plan)

if "model" in stages:
    # A host short of memory or disk for its variant fails here, before anything is installed.
    resources = host.get_fact(HostResources)  # once, for the model and kernel stages
    ram = resources["ram_bytes"]
    variant = model.auto_variant(plan, ram) if s.variant == "auto" else s.variant
    model.check_memory(s, variant, plan, ram)
    src = source_for(s, variant)

py = pyplan.python_plan(s, plan) if "python" in stages else None  # checked before any change
# Every upstream this host will fetch from is asked before any host is touched.
preflight.check_sources(host.name, s, src if "model" in stages else None, py)

if "model" in stages:
    model.check_resources(name="Model: disk space", s=s, variant=variant,
                          model_dir=s.model_dir(variant))

serving = "serve" in stages and "model" in stages  # settings_for refuses serve without model
if serving:
    # A port held by another program (or no systemd) fails the host here, before any change.
    serve.check_port(name="Serve: systemd, and the port is free", s=s)

if "system" in stages:
    system.base_packages(name="System: base packages",
                         extra=swarm.HOST_PACKAGES if s.weights_transfer == "swarm" else None)

if "gpu" in stages and plan["gpu"]:
    gpu.secure_boot(name="GPU: Secure Boot check", plan=plan,
                    module_signed=s.secure_boot_module_signed)
    gpu.cuda_repo(name="GPU: NVIDIA CUDA apt repo", plan=plan, s=s)
    if not plan["keep_driver"]:
        gpu.nouveau(name="GPU: blacklist nouveau", allow_reboot=s.allow_reboot)
    gpu.packages(name="GPU: driver, CUDA toolkit, cuDNN", plan=plan, s=s)
    gpu.hold(name="GPU: hold the driver, toolkit and cuDNN packages", plan=plan)
    gpu.cuda_link(name="GPU: /usr/local/cuda -> planned toolkit", plan=plan)
    gpu.module(name="GPU: kernel module matches driver libraries", plan=plan,
               allow_reboot=s.allow_reboot)

env_ops = []  # Python env operations: a change restarts the server (serve stage)
if py:
    if py["backend"] == "conda":
        pyenv.conda(name="Python: conda installed (sha256-checked), .condarc", py=py)
    pyenv.env(name="Python: env with the planned Python, pip.conf", py=py)
    env_ops.append(pyenv.packages(name="Python: torch for the resolved CUDA and the pinned requirements", py=py))
    pyenv.verify(name="Python: verify torch/transformers/cpm_kernels", py=py)

if "cuda_libs" in stages and plan["gpu"]:
    cuda_libs.expose(name="CUDA libs: link where cpm_kernels looks", plan=plan)
    cuda_libs.check(name="CUDA libs: cpm_kernels' own lookup",
                    python=py["python"] if py else s.python)

if "model" in stages:
    model_dir = s.model_dir(variant)
    model.clone(name="Model: clone ChatGLM-6B code", url=src["code_url"], dest=s.code_dir,
                revision=src["code_revision"], allow_floating=s.allow_floating_revision)
    changing = []  # operations whose change means the server must restart
    changing.append(model.clone(name="Model: clone the model repo", url=src["model_url"], dest=model_dir,
                revision=src["model_revision"], allow_floating=s.allow_floating_revision))
    changing.append(model.weights(name="Model: weights", s=s, model_dir=model_dir,
                    share=src["share"], share_path=src["share_path"], mirror=src.get("mirror", "")))

    if "kernel" in stages and variant in ("int4", "int8"):
        changing.append(kernel.build(name="Kernel: build the CPU quantization kernel", model_dir=model_dir,
                                     cpus=resources["cpus"]))
        changing.append(kernel.patch_quantization(name="Kernel: patch quantization.py", model_dir=model_dir,
                                                  cpus=resources["cpus"]))
        caps = gpu_kernels.needs_own_kernels(plan)
        if caps and s.build_gpu_kernels:
            changing.append(gpu_kernels.build(name="Kernel: build GPU kernels for this GPU",
                                              model_dir=model_dir, caps=caps))
            changing.append(gpu_kernels.patch(name="Kernel: quantization.py loads the GPU kernels",
                                              model_dir=model_dir, caps=caps))

    if "smoke" in stages and s.smoke_test:
        device = "cuda" if plan["gpu"] else "cpu"
        smoke.run(name="Smoke: chat test", s=s, variant=variant, model_dir=model_dir,
                  revision=src["model_revision"], device=device)
        smoke.fetch(name="Smoke: fetch result", s=s,
                    local_dir=str(state.chatglm_report.report_dir / "hosts"))

    if serving:
        device = "cuda" if plan["gpu"] else "cpu"
        where = dict(variant=variant, model_dir=model_dir, revision=src["model_revision"], device=device)
        serve.install(name="Serve: user and server code", s=s)
        serve.config(name="Serve: config", s=s, **where)
        serve.unit(name="Serve: systemd unit", s=s, **where)
        serve.api_key(name="Serve: API key", s=s)
        planned = serve.planned_fingerprint(s, **where)
        # The model, its kernels or the env changed in this run: what the host has when the
        # service starts is not what the facts read at the start of the run saw.
        restart = any(op.will_change for op in changing + env_ops)
        serve.service(name="Serve: service enabled, running what is deployed", s=s,
                      fingerprint=planned["fingerprint"], unit_sha1=planned["unit_sha1"],
                      model_dir=model_dir, changing=restart)
        result = f"{s.install_dir}/serve/ready.json"
        serve.ready(name="Serve: ready on /health, the smoke conversation through the API", s=s,
                    fingerprint=planned["fingerprint"], result_path=result, model_dir=model_dir,
                    changing=restart, chat=s.smoke_test)
        serve.fetch_key(name="Serve: bring the API key back", s=s,
                        local_path=str(state.chatglm_report.report_dir / "keys" / f"{host.name}.key"))
        serve.fetch_result(name="Serve: fetch result", s=s, result_path=result,
                           local_dir=str(state.chatglm_report.report_dir / "serve"))

# Facts served from the prefetch are read live once this host's first command runs.
state.chatglm_facts.watch(state, host)
