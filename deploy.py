"""Take hosts to a verified, working ChatGLM-6B install.

    pyinfra inventories/gpu.py deploy.py            # apply
    pyinfra inventories/gpu.py deploy.py --dry --diff   # show every change first

pyinfra runs this file once per host to collect operations, then executes them
stage by stage across all hosts. Every host's settings are checked before any
operation runs, so bad inventory data stops the run with nothing touched.
"""

from pathlib import Path

from pyinfra import host, inventory, state

from operations import gpu, kernel, model, pyenv, smoke, system
from operations.report import FleetReport
from operations.settings import ROOT, settings_for, source_for
from operations.system import MemoryBytes

# Every host's data is validated on the first pass, before any host's facts are read.
if not getattr(state, "chatglm_checked", False):
    for each in inventory:
        each_settings = settings_for(each)
        if each_settings.variant != "auto":
            source_for(each_settings, each_settings.variant)
    state.chatglm_checked = True
    report_dir = Path(settings_for(next(iter(inventory))).report_dir)
    report_dir = report_dir if report_dir.is_absolute() else Path(state.cwd or ROOT) / report_dir
    state.chatglm_report = FleetReport(report_dir, len(state.activated_hosts))
    state.add_callback_handler(state.chatglm_report)

s = settings_for(host)
os_ident = system.check_supported()

# Stage 1: GPU detection and the resolver.
plan = gpu.gpu_plan(s, os_ident)
gpu.report_plan(name="GPU: detect and resolve the stack", plan=plan)

# Stage 2: base packages (git, git-lfs, gcc, python3-venv).
system.base_packages(name="System: base packages")

# Stage 3: the Python environment.
pyenv.venv(name="Python: venv with pinned requirements", s=s)
pyenv.verify(name="Python: verify torch/transformers/cpm_kernels", s=s, expect_cuda=plan["gpu"])

# Stage 4: code and model repos at pinned commits, without LFS smudge.
if s.variant == "auto":
    variant = model.auto_variant(plan, host.get_fact(MemoryBytes))
else:
    variant = s.variant
src = source_for(s, variant)
model_dir = s.model_dir(variant)
model.clone(name="Model: clone ChatGLM-6B code", url=src["code_url"], dest=s.code_dir,
            revision=src["code_revision"])
model.clone(name="Model: clone the model repo", url=src["model_url"], dest=model_dir,
            revision=src["model_revision"])

# Stage 5: weights from the share, verified against the LFS pointers.
model.weights(name="Model: weights from the share", s=s, model_dir=model_dir,
              share=src["share"], share_path=src["share_path"])

# Stage 6: the CPU kernel built once, quantization.py patched to use it.
if variant in ("int4", "int8"):
    kernel.build(name="Kernel: build the CPU quantization kernel", model_dir=model_dir)
    kernel.patch_quantization(name="Kernel: patch quantization.py", model_dir=model_dir)

# Stage 7: smoke test and the result brought back for the fleet report.
if s.smoke_test:
    device = "cuda" if plan["gpu"] else "cpu"
    smoke.run(name="Smoke: chat test", s=s, variant=variant, model_dir=model_dir,
              revision=src["model_revision"], device=device)
    smoke.fetch(name="Smoke: fetch result", s=s,
                local_dir=str(state.chatglm_report.report_dir / "hosts"))
