"""Your hosts: list them below (replacing the example names), then run

    pyinfra inventories/gpu.py deploy.py --dry --diff    # see every change first
    pyinfra inventories/gpu.py deploy.py

Each host is (name, {data}). Every setting below is optional; the value shown is
its default. Put settings shared by a group in `group_data/<group>.py` or in the
`_defaults` dict here.

Connection (pyinfra's own keys):
    ssh_hostname, ssh_user="root", ssh_port=22, ssh_key, ssh_known_hosts_file,
    ssh_strict_host_key_checking="yes" (keep it: hosts are identified by their key)

Model:
    variant="auto"            fp16 | int8 | int4 | auto (by GPU memory: fp16 >= 13 GB,
                              int8 >= 10 GB, else int4; CPU-only hosts get int4)
    install_dir="/opt/chatglm"   venv, code checkout, models/<repo>, smoke/ (any absolute
                              path: spaces, quotes, $ work; no control characters or
                              backslashes, in any path setting)
    code_url, code_revision   the ChatGLM-6B code repo and a 40-hex commit (data/models.toml
                              pins reviewed commits of every repo: fp16 at v1.1.0)
    model_url                 model repo URL; "{name}" becomes chatglm-6b / -int8 / -int4
    model_revision            a 40-hex commit of the model repo ...
    model_revisions={}        ... or one per variant: {"int4": "<commit>", ...}
    allow_floating_revision=False  accept a branch or tag instead of a commit (the model
                              code runs with trust_remote_code: pin what you reviewed)
    check_revisions=True      before any host is touched, ask each remote (from this
                              machine, git fetch of that one commit into weights_cache)
                              whether it has the pinned commit; False when this machine
                              cannot reach the remotes the hosts use
    check_sources=True        before any host is touched, ask from this machine: the share
                              lists the variant's files with the sizes of the pinned LFS
                              pointers (or the mirror serves them), the conda installer,
                              pip index and torch index answer; False when only the hosts
                              can reach them

Weights (Tsinghua cloud Seafile shares, data/models.toml):
    weights_mode="control"    control: downloaded once to the control machine, pushed to
                              hosts | direct: each host downloads | mirror: a LAN URL
    weights_cache="~/.cache/chatglm-deploy"   control-side cache (content-addressed)
    weights_transfer="push"   with weights_mode="control", how the cache reaches the hosts:
                              push: uploaded to each host over SSH | swarm: the hosts fetch
                              from this machine and from each other over BitTorrent (needs
                              aria2 and opentracker here; docs/swarm.md)
    weights_swarm_address=""  swarm: this machine's address as the hosts reach it (empty: the
                              local address of the deploy's SSH connection to each host)
    seafile_url=""            another Seafile server holding the same share paths
    weights_share=""          a different share link (https://HOST/d/TOKEN/)
    weights_share_path=""     folder inside that share ("{name}" allowed)
    weights_mirror=""         weights_mode="mirror": a LAN HTTP URL holding <repo name>/<file>
                              (or with "{name}" where the repo name goes)
    weights_attempts=6        tries in a row that bring no byte before a download gives up
                              (a rerun resumes it)

Python (data/python.toml holds the installer and torch pins):
    python_backend="conda"    conda: Miniforge (or Miniconda) in conda_dir, env envs/chatglm |
                              venv: install_dir/venv made by the host's own `python`
    python_version=""         conda env's Python; "" = the newest the lock and torch share (3.11)
    python="python3"          interpreter that creates the venv (venv backend)
    venv_system_site_packages=False  the venv sees the system Python's packages (its torch):
                              with requirements="chatglm-py312-system-torch" on a Python 3.12
                              host that brings a CUDA torch
    requirements="chatglm-cpu"    lock file in data/requirements/ (without .txt), or a path
    pip_index_url=""          a PyPI mirror, e.g. https://pypi.tuna.tsinghua.edu.cn/simple/
                              (also written to <env>/pip.conf)
    torch_index_url=""        PEP 503 index for torch; "{tag}" becomes cpu/cu121/...
                              ("" = https://download.pytorch.org/whl/{tag})
    torch_version=""          another torch release for the resolved build
    conda_dir=""              "" = install_dir/conda; no spaces (conda's installer refuses them)
    conda_installer=""        miniforge (default) | miniconda
    conda_installer_url=""    a mirror of the installer (the pinned sha256 still applies when
                              the file name is the same) ...
    conda_installer_sha256="" ... or a different installer with its sha256
    conda_channels=""         comma-separated ("" = conda-forge for Miniforge, defaults for Miniconda)
    conda_mirror=""           e.g. https://mirrors.tuna.tsinghua.edu.cn/anaconda: .condarc maps
                              the default and conda-forge/pytorch/nvidia channels onto it

GPU stack (resolved from data/compat.toml when unset):
    cuda_version=""           e.g. "12.4"; must suit the GPU (H100 needs >= 11.8)
    driver_branch=""          e.g. "550"; never older than the toolkit needs
    cudnn=""                  apt spec, e.g. "libcudnn8=8.9.7.29-1+cuda12.2"
    cuda_repo_url="https://developer.download.nvidia.com/compute/cuda/repos"  (a mirror)
    allow_reboot=False        reboot to cure a driver/library version mismatch
    kernel_headers=True       install linux-headers for the running kernel (DKMS needs them)
    secure_boot_module_signed=False   a MOK is enrolled and DKMS signs the module
    gpu_compute_cap=""        for a GPU whose PCI id is not in data/compat.toml [pci]
    gpu_memory_mib=0          ... and its memory
    check_memory=True         stop before any download when the GPU memory (or RAM on CPU
                              hosts) is below data/models.toml's figure for the variant
    build_gpu_kernels=True    build int4/int8 GPU kernels on hosts whose GPU upstream's
                              embedded kernels do not cover (sm_90 and newer)
    stages="all"              or a comma list of gpu,system,python,cuda_libs,model,kernel,smoke,serve
                              (kernel, smoke and serve need model beside them)

Smoke test and report:
    smoke_test=True           run a chat on every host, bring the figures back (a host that
                              serves: the conversation goes through its running service)
    smoke_max_new_tokens=64   cap per answer (0 = the model's own default)
    report_dir="reports"      where fleet.md and hosts/<host>.json are written

Serving (the serve stage: runtime/server.py as the systemd unit chatglm-server.service,
run by serve_user, hardened; needs systemd as PID 1 and the model stage in the same run):
    serve_host="127.0.0.1"    address the API listens on: an IP address ("0.0.0.0" = every
                              interface). Every address, loopback included, requires the API
                              key: so a non-loopback address needs no more settings
    serve_port=8000           TCP port, 1-65535; a port held by another program fails the host
                              before anything on it changes, naming the program
    serve_api_key=""          the Bearer key clients send (16+ characters, no spaces); "" = 32
                              random bytes generated on the host at the first deploy, kept there
                              (/etc/chatglm/api.key, 0600) and brought back to
                              <report_dir>/keys/<host>.key (0600). Never printed
    serve_queue=32            requests waiting for the model; one more answers 429
    serve_max_batch=8         answers generated at once (continuous batching)
    serve_max_prompt_tokens=1536  cap on a conversation's tokens (400 above it)
    serve_max_tokens=512      cap on an answer's new tokens (400 above it)
    serve_backend="auto"      auto | engine | stream_chat (runtime/server.py)
    serve_drain_s=30          on a restart, seconds in-flight requests may still finish
    serve_threads=0           torch's CPU threads in the server; 0 = torch's default (one per core)
    serve_ready_timeout_s=600 after a (re)start, how long to wait for GET /health to be ready
    serve_user="chatglm"      the unprivileged system user the service runs as

Run:
    batch_facts=True          read the facts a host read last time in one SSH command
                              (operations/factcache.py; list kept in weights_cache/fact-plans)
"""

_defaults = {
    "ssh_user": "root",
    "ssh_strict_host_key_checking": "yes",
}

gpu_servers = [
    ("gpu-01.lab.example", {**_defaults, "variant": "fp16"}),
    ("gpu-02.lab.example", {**_defaults, "cuda_version": "12.4"}),
]

cpu_servers = [
    ("cpu-01.lab.example", {**_defaults, "variant": "int4"}),
]

# Before pyinfra connects: a missing ssh_key file stops the run naming the host and the fix.
from operations.preflight import check_ssh_keys  # noqa: E402

check_ssh_keys(gpu_servers, cpu_servers)
