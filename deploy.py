"""Take hosts to a verified, working ChatGLM-6B install.

    pyinfra inventories/gpu.py deploy.py                # apply
    pyinfra inventories/gpu.py deploy.py --dry --diff   # show every change first

pyinfra runs this file once per host to collect operations, then executes them stage by
stage across all hosts. Every host's settings are checked before any host is touched, and
each host's plan (GPU stack, variant, Python env, upstreams) before any of its operations:
bad inventory data stops the run with nothing changed. The stages are pyinfra deploys
(operations/stages.py); `--data stages=...` selects some of them.
"""

from pyinfra import host

from operations import stages
from operations.checks import settings_for

stages.begin()  # once per run: every host's settings, the fleet report, the run's lock id
s = settings_for(host)
if stages.lock(s):  # False: another deploy holds this host
    plan = stages.plan(s, stages.detect(s))
    stages.disk(s, plan)
    stages.serve_port(s)
    stages.base_system(s)
    stages.gpu_stack(s, plan)
    env_changes = stages.python_env(plan)
    stages.cuda_links(s, plan)
    model_changes = stages.model_files(s, plan)
    kernel_changes = stages.kernels(s, plan)
    stages.smoke_test(s, plan)
    stages.serving(s, plan, changing=model_changes + kernel_changes + env_changes)
stages.end()
