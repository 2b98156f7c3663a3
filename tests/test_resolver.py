"""operations.resolver (GPU -> CUDA -> driver -> cuDNN -> torch) and operations.settings.

Pure unit tests: a host here is a name and a data dict, nothing is connected.
"""

from types import SimpleNamespace

import pytest

from operations.resolver import GpuPlan, resolve, version_tuple
from operations.checks import settings_for
from operations.settings import STAGES, SettingError, load_toml, source_for

HOST = "gpu-node-7"
H100 = {"name": "NVIDIA H100 80GB HBM3", "memory_mib": 81559, "compute_cap": "9.0"}
A10 = {"name": "NVIDIA A10", "memory_mib": 23028, "compute_cap": "8.6"}
T4 = {"name": "Tesla T4", "memory_mib": 15360, "compute_cap": "7.5"}
B200 = {"name": "NVIDIA B200", "memory_mib": 183359, "compute_cap": "10.0"}
COMMIT = "a" * 40
COMPAT = load_toml("compat.toml")


def plan_for(gpus, os_id, installed_driver="", **pins):
    return resolve(HOST, gpus, os_id, pins, installed_driver=installed_driver)


def error_of(func, *args, **kwargs) -> str:
    with pytest.raises(SettingError) as info:
        func(*args, **kwargs)
    return str(info.value)


def assert_names(message: str, setting: str, *more: str):
    """Every SettingError names the host and the setting and says how to fix it."""
    assert repr(HOST) in message, message
    assert f"setting {setting!r}" in message, message
    assert "Fix:" in message, message
    for text in more:
        assert text in message, (text, message)


def host_with(**data):
    return SimpleNamespace(name=HOST, data=data)


# ---------------------------------------------------------------- resolve


def test_h100_on_ubuntu_2404_gets_cuda_13_branch_580():
    plan = plan_for([H100], "ubuntu-24.04")
    assert plan == GpuPlan(
        gpu=True, cuda="13.0", min_driver="580.65.06", driver_branch="580",
        keep_driver=False, cudnn="libcudnn9-cuda-13", torch_tag="cu130",
        repo_distro="ubuntu2404")


def test_ampere_on_debian_11_default():
    plan = plan_for([A10], "debian-11")
    assert (plan.cuda, plan.driver_branch, plan.torch_tag, plan.repo_distro) == \
        ("12.4", "550", "cu124", "debian11")
    assert plan.cudnn == "libcudnn9-cuda-12" and not plan.keep_driver


@pytest.mark.parametrize("os_id, repo, cuda", [
    ("ubuntu-20.04", "ubuntu2004", "12.4"), ("ubuntu-22.04", "ubuntu2204", "13.0"),
    ("ubuntu-24.04", "ubuntu2404", "13.0"), ("debian-11", "debian11", "12.4"),
    ("debian-12", "debian12", "13.0")])
def test_default_per_os(os_id, repo, cuda):
    plan = plan_for([H100], os_id)
    assert (plan.repo_distro, plan.cuda) == (repo, cuda)
    assert plan.driver_branch == COMPAT["cuda"][cuda]["branch"]


def test_h100_with_cuda_117_is_refused():
    message = error_of(plan_for, [H100], "ubuntu-22.04", cuda_version="11.7")
    assert_names(message, "cuda_version", "11.7", "11.8", "9.0")


def test_the_newest_arch_of_several_gpus_decides():
    message = error_of(plan_for, [T4, H100], "ubuntu-22.04", cuda_version="11.7")
    assert_names(message, "cuda_version", H100["name"], "11.8")
    assert plan_for([T4, H100], "ubuntu-22.04", cuda_version="11.8").cuda == "11.8"


def test_unknown_cuda_version():
    assert_names(error_of(plan_for, [H100], "ubuntu-22.04", cuda_version="12.99"),
                 "cuda_version", "12.99", "13.0")


def test_unknown_compute_capability():
    gpu = {"name": "NVIDIA Future", "memory_mib": 1, "compute_cap": "99.0"}
    assert_names(error_of(plan_for, [gpu], "ubuntu-24.04"), "gpu", "99.0", "compat.toml")


def test_driver_branch_older_than_the_toolkit_needs():
    message = error_of(plan_for, [H100], "ubuntu-24.04", driver_branch="570")
    assert_names(message, "driver_branch", "570", "580.65.06")


def test_driver_branch_pin_given_as_number():
    assert plan_for([H100], "ubuntu-24.04", driver_branch=590).driver_branch == "590"
    assert_names(error_of(plan_for, [H100], "ubuntu-24.04", driver_branch=535), "driver_branch")


def test_pinned_driver_branch_new_enough_is_used():
    plan = plan_for([A10], "ubuntu-22.04", cuda_version="12.4", driver_branch="570")
    assert (plan.cuda, plan.driver_branch, plan.keep_driver) == ("12.4", "570", False)


@pytest.mark.parametrize("os_id", ["centos-7", "ubuntu-18.04", "debian-13", ""])
def test_unsupported_os(os_id):
    message = error_of(plan_for, [H100], os_id)
    assert_names(message, "os", repr(os_id), "ubuntu-24.04")


def test_cuda_not_packaged_for_the_os():
    message = error_of(plan_for, [H100], "ubuntu-20.04", cuda_version="13.0")
    assert_names(message, "cuda_version", "13.0", "ubuntu-20.04", "12.4")
    # cuda-drivers-515 (CUDA 11.7) is absent from the Ubuntu 24.04 repo (docs/upstream.md §5).
    assert_names(error_of(plan_for, [A10], "ubuntu-24.04", cuda_version="11.7"),
                 "cuda_version", "ubuntu-24.04")


def test_gpu_too_new_for_every_cuda_the_os_packages():
    # No cuda_version pin could help: the error names the OS, its newest CUDA and the need.
    message = error_of(plan_for, [B200], "ubuntu-20.04")
    assert_names(message, "os", "'ubuntu-20.04'", "carries CUDA up to 12.4", B200["name"],
                 "10.0", "12.8")
    # A pin does not change that verdict.
    assert_names(error_of(plan_for, [B200], "debian-11", cuda_version="12.4"), "os",
                 "carries CUDA up to 12.4")
    # An OS that carries CUDA new enough resolves.
    assert plan_for([B200], "ubuntu-22.04").cuda == "13.0"


def test_installed_driver_that_satisfies_is_kept():
    plan = plan_for([H100], "ubuntu-24.04", installed_driver="580.82.07")
    assert plan.keep_driver is True
    assert plan.driver_branch == "580"


def test_installed_newer_driver_is_never_downgraded():
    # Default branch for CUDA 12.4 is 550; a 570 driver is kept, not replaced by 550.
    plan = plan_for([A10], "debian-11", installed_driver="570.133.20")
    assert (plan.keep_driver, plan.driver_branch) == (True, "570")
    # Nor by a lower pinned branch that would itself be new enough.
    plan = plan_for([A10], "debian-11", installed_driver="580.65.06", driver_branch="550")
    assert (plan.keep_driver, plan.driver_branch) == (True, "580")


def test_installed_driver_too_old_is_replaced():
    plan = plan_for([H100], "ubuntu-24.04", installed_driver="535.247.01")
    assert (plan.keep_driver, plan.driver_branch) == (False, "580")
    # Same branch but below the toolkit's minimum: not kept either.
    plan = plan_for([H100], "ubuntu-24.04", installed_driver="580.65.05")
    assert (plan.keep_driver, plan.driver_branch) == (False, "580")


def test_exact_minimum_driver_is_kept():
    # ubuntu-22.04 defaults to CUDA 13.0 now: pin 12.8 to test its minimum (570.26).
    plan = plan_for([H100], "ubuntu-22.04", installed_driver="570.26", cuda_version="12.8")
    assert plan.cuda == "12.8" and plan.keep_driver is True
    assert plan.driver_branch == "570"
    plan = plan_for([H100], "ubuntu-22.04", installed_driver="580.65.06")
    assert (plan.cuda, plan.keep_driver, plan.driver_branch) == ("13.0", True, "580")
    # Unpinned, 570.26 is below CUDA 13.0's minimum: replaced by branch 580.
    plan = plan_for([H100], "ubuntu-22.04", installed_driver="570.26")
    assert (plan.cuda, plan.keep_driver, plan.driver_branch) == ("13.0", False, "580")


def test_cpu_only_host():
    assert plan_for([], "ubuntu-24.04") == GpuPlan()
    # No GPU: the OS does not matter, nothing of the GPU stack is planned.
    assert plan_for([], "centos-7") == GpuPlan()


def test_cudnn_pin_wins():
    plan = plan_for([H100], "ubuntu-22.04", cuda_version="12.1", cudnn="libcudnn8=8.9.7.29-1+cuda12.2")
    assert plan.cudnn == "libcudnn8=8.9.7.29-1+cuda12.2" and plan.torch_tag == "cu121"


def test_version_tuple():
    assert version_tuple("580.65.06") == (580, 65, 6)
    assert version_tuple("570.26") > version_tuple("570.133")[:1]


# ---------------------------------------------------------------- data/compat.toml

# docs/upstream.md §5, CUDA release notes table 3.
MIN_DRIVER = {"11.7": "515.43.04", "11.8": "520.61.05", "12.1": "530.30.02", "12.4": "550.54.14",
              "12.8": "570.26", "13.0": "580.65.06"}


@pytest.mark.parametrize("cuda", sorted(COMPAT["cuda"], key=version_tuple))
def test_compat_cuda_row_is_consistent(cuda):
    row = COMPAT["cuda"][cuda]
    # The default branch's first release is <branch>.x: it must reach the toolkit's minimum.
    assert version_tuple(row["min_driver"])[0] <= int(row["branch"]), row
    assert row["min_driver"] == MIN_DRIVER[cuda]
    assert row["torch_tag"] == "cu" + cuda.replace(".", "")
    major = cuda.split(".")[0]
    assert row["cudnn"].startswith("libcudnn8=") or row["cudnn"] == f"libcudnn9-cuda-{major}", row


def test_compat_os_rows_are_consistent():
    repos = {"ubuntu2004", "ubuntu2204", "ubuntu2404", "debian11", "debian12"}
    assert {row["repo"] for row in COMPAT["os"].values()} == repos
    for os_id, row in COMPAT["os"].items():
        assert set(row["cudas"]) <= set(COMPAT["cuda"]), os_id
    assert "11.7" not in COMPAT["os"]["ubuntu-24.04"]["cudas"]  # no cuda-drivers-515 there


V100 = {"name": "Tesla V100-SXM2-16GB", "memory_mib": 16384, "compute_cap": "7.0"}
P100 = {"name": "Tesla P100-PCIE-16GB", "memory_mib": 16384, "compute_cap": "6.0"}
# What each GPU gets unpinned, per OS: the newest CUDA whose toolkit and torch build run on it.
NEWEST_THAT_RUNS = {
    "V100": {"ubuntu-20.04": "12.4", "ubuntu-22.04": "12.4", "ubuntu-24.04": "12.4",
             "debian-11": "12.4", "debian-12": "12.4"},
    "P100": {"ubuntu-20.04": "12.4", "ubuntu-22.04": "12.4", "ubuntu-24.04": "12.4",
             "debian-11": "12.4", "debian-12": "12.4"},
    "T4": {"ubuntu-20.04": "12.4", "ubuntu-22.04": "13.0", "ubuntu-24.04": "13.0",
           "debian-11": "12.4", "debian-12": "13.0"},
    "H100": {"ubuntu-20.04": "12.4", "ubuntu-22.04": "13.0", "ubuntu-24.04": "13.0",
             "debian-11": "12.4", "debian-12": "13.0"},
}
GPUS_BY_NAME = {"V100": V100, "P100": P100, "T4": T4, "H100": H100}


@pytest.mark.parametrize("gpu", sorted(NEWEST_THAT_RUNS))
@pytest.mark.parametrize("os_id", sorted(COMPAT["os"]))
def test_unpinned_hosts_get_the_newest_stack_that_runs_on_their_gpu(gpu, os_id):
    plan = plan_for([GPUS_BY_NAME[gpu]], os_id)
    assert plan.cuda == NEWEST_THAT_RUNS[gpu][os_id]
    archs = load_toml("python.toml")["torch"]["builds"][plan.torch_tag]["archs"]
    from operations.resolver import runs_on
    assert runs_on(archs, GPUS_BY_NAME[gpu]["compute_cap"])


@pytest.mark.parametrize("os_id", sorted(COMPAT["os"]))
@pytest.mark.parametrize("gpu", sorted(NEWEST_THAT_RUNS))
def test_each_packaged_cuda_pinned_runs_or_says_why_and_what_would(gpu, os_id):
    card = GPUS_BY_NAME[gpu]
    for cuda in COMPAT["os"][os_id]["cudas"]:
        older_volta = card["compute_cap"] in ("6.0", "7.0")
        too_old = version_tuple(cuda) < version_tuple(COMPAT["arch"][card["compute_cap"]]["min_cuda"])
        if too_old:
            continue
        if older_volta and cuda in ("12.8", "13.0"):
            message = error_of(plan_for, [card], os_id, cuda_version=cuda)
            assert_names(message, "cuda_version", f"= {cuda!r} cannot run here",
                         f"set cuda_version to {NEWEST_THAT_RUNS[gpu][os_id]}, the newest that runs here")
        else:
            assert plan_for([card], os_id, cuda_version=cuda).cuda == cuda


def test_v100_pins_say_exactly_why():
    assert error_of(plan_for, [V100], "ubuntu-24.04", cuda_version="13.0") == (
        "host 'gpu-node-7': setting 'cuda_version' = '13.0' cannot run here: CUDA 13.0 no longer "
        "supports Tesla V100-SXM2-16GB (compute capability 7.0, Volta: CUDA 12.9 at most). "
        "Fix: set cuda_version to 12.4, the newest that runs here, or leave it unset")
    assert error_of(plan_for, [V100], "debian-12", cuda_version="12.8") == (
        "host 'gpu-node-7': setting 'cuda_version' = '12.8' cannot run here: torch 2.8.0+cu128 "
        "carries no kernels for Tesla V100-SXM2-16GB (compute capability 7.0; it carries 7.5, "
        "8.0, 8.6, 9.0, 10.0, 12.0). Fix: set cuda_version to 12.4, the newest that runs here, "
        "or leave it unset")


def test_a_mixed_host_gets_what_runs_on_every_gpu():
    assert plan_for([H100, V100], "ubuntu-22.04").cuda == "12.4"
    assert plan_for([H100, T4], "ubuntu-22.04").cuda == "13.0"


def test_runs_on_follows_the_major_version():
    from operations.resolver import runs_on
    assert runs_on(["6.0", "7.0"], "6.1") and runs_on(["8.0"], "8.9")
    assert not runs_on(["7.5", "8.0"], "7.0") and not runs_on(["9.0"], "10.0")


def test_compat_arch_rows():
    assert COMPAT["arch"]["9.0"]["min_cuda"] == "11.8"
    assert COMPAT["arch"]["8.9"]["min_cuda"] == "11.8"
    assert COMPAT["arch"]["10.0"]["min_cuda"] == COMPAT["arch"]["12.0"]["min_cuda"] == "12.8"
    # Every known architecture is served by some CUDA in the table.
    newest = max(COMPAT["cuda"], key=version_tuple)
    for cap, arch in COMPAT["arch"].items():
        assert version_tuple(arch["min_cuda"]) <= version_tuple(newest), cap


# ---------------------------------------------------------------- settings


def test_settings_defaults():
    s = settings_for(host_with())
    assert s.host == HOST and s.variant == "auto" and s.kernel_headers is True
    assert s.stage_list == list(STAGES)
    assert s.cuda_repo_url == "https://developer.download.nvidia.com/compute/cuda/repos"


def test_settings_coercions():
    s = settings_for(host_with(cuda_version=12.4, driver_branch=580, stages="gpu, system"))
    assert (s.cuda_version, s.driver_branch) == ("12.4", "580")
    assert s.stage_list == ["gpu", "system"]


def test_unknown_variant():
    assert_names(error_of(settings_for, host_with(variant="int2")), "variant", "'int2'", "int4")


def test_bool_given_as_string():
    assert_names(error_of(settings_for, host_with(kernel_headers="false")), "kernel_headers",
                 "'false'", "kernel_headers=False")
    assert_names(error_of(settings_for, host_with(allow_reboot="yes")), "allow_reboot")


def test_number_given_as_string():
    assert_names(error_of(settings_for, host_with(gpu_memory_mib="81559")), "gpu_memory_mib")


def test_bool_given_for_a_number():
    assert_names(error_of(settings_for, host_with(smoke_max_new_tokens=True)), "smoke_max_new_tokens",
                 "True", "integer")
    assert_names(error_of(settings_for, host_with(gpu_memory_mib=False)), "gpu_memory_mib", "False")
    assert settings_for(host_with(gpu_memory_mib=81559)).gpu_memory_mib == 81559


@pytest.mark.parametrize("setting", ["pip_index_url", "cuda_repo_url", "weights_mirror", "code_url"])
def test_malformed_url(setting):
    message = error_of(settings_for, host_with(**{setting: "not a url", "weights_mode": "direct"}))
    assert_names(message, setting, "'not a url'")


def test_good_mirror_urls_pass():
    s = settings_for(host_with(pip_index_url="https://pypi.tuna.tsinghua.edu.cn/simple",
                               cuda_repo_url="http://10.0.0.5/cuda/repos/"))
    assert s.pip_index_url.startswith("https://")


def test_unknown_stage():
    message = error_of(settings_for, host_with(stages="gpu,modle"))
    assert_names(message, "stages", "modle", "cuda_libs")


@pytest.mark.parametrize("stage", ["kernel", "smoke", "serve"])
def test_a_stage_on_the_model_checkout_alone_says_it_needs_model(stage):
    """Selected without the model stage it would do nothing: the run stops instead."""
    message = error_of(settings_for, host_with(stages=f"gpu,{stage}"))
    assert_names(message, "stages", f"runs '{stage}' without 'model'", "add 'model' to stages")
    assert settings_for(host_with(stages=f"model,{stage}")).stage_list == ["model", stage]


@pytest.mark.parametrize("stages", ["", " ", ",", " , "])
def test_empty_stages(stages):
    assert_names(error_of(settings_for, host_with(stages=stages)), "stages", "empty", "'all'")


def test_mirror_mode_needs_a_mirror():
    assert_names(error_of(settings_for, host_with(weights_mode="mirror")), "weights_mirror")


def test_relative_install_dir():
    assert_names(error_of(settings_for, host_with(install_dir="opt/chatglm")), "install_dir")


def test_model_revisions_must_be_a_mapping():
    assert_names(error_of(settings_for, host_with(model_revisions=COMMIT)), "model_revisions")


def test_missing_requirements_lock():
    assert_names(error_of(settings_for, host_with(requirements="nope")), "requirements")


# ---------------------------------------------------------------- source_for


def test_floating_revision_needs_allow_floating_revision():
    s = settings_for(host_with(code_revision="main", model_revision=COMMIT))
    message = error_of(source_for, s, "int4")
    assert_names(message, "code_revision", "'main'", "trust_remote_code",
                 "allow_floating_revision=True")


def test_defaults_pin_the_reviewed_commits():
    # A host that sets nothing gets reviewed commits (fp16 at v1.1.0), no floating ref.
    s = settings_for(host_with())
    assert source_for(s, "fp16")["model_revision"] == "942945df047dee66f653c68ae0e56655045f1741"
    assert source_for(s, "int4")["model_revision"] == "6c5205c47d0d2f7ea2e44715d279e537cae0911f"
    assert source_for(s, "int8")["model_revision"] == "22906aeb32fd7952ce323dc9d25e01693b270da6"
    src = source_for(s, "int4")
    assert src["code_revision"] == "a0d6b9e1698f5bfd7ca610ebf03a4bd595f53dda"
    assert src["settings"]["model_revision"] == "model_revision (data/models.toml)"
    # The published sha256 apply to the default commit only.
    assert src["reviewed"]["pytorch_model.bin"].startswith("245786435bde")
    assert source_for(settings_for(host_with(model_revision=COMMIT)), "int4")["reviewed"] == {}


def test_a_misspelt_setting_stops_naming_the_nearest():
    message = error_of(settings_for, host_with(varient="int4"))
    assert message == ("host 'gpu-node-7': setting 'varient' is not a setting of this deploy "
                       "nor one of pyinfra's. Fix: did you mean 'variant'? (every setting: "
                       "inventories/gpu.py)")
    assert "'smoke_max_new_tokens'" in error_of(settings_for, host_with(smoke_max_new_tokenz=8))
    assert "remove it" in error_of(settings_for, host_with(zzz_unrelated=1))
    # pyinfra's own keys pass: connector settings and global-argument defaults.
    settings_for(host_with(ssh_port=22, ssh_known_hosts_file="/k", _sudo=True, _env={}))


def test_floating_revision_allowed():
    s = settings_for(host_with(code_revision="main", model_revision="v1.1.0",
                               allow_floating_revision=True))
    src = source_for(s, "int4")
    assert (src["code_revision"], src["model_revision"]) == ("main", "v1.1.0")


def test_source_for_pinned_and_mirrored():
    other = "b" * 40
    s = settings_for(host_with(code_revision=COMMIT, model_revision=COMMIT,
                               model_revisions={"int4": other},
                               model_url="https://hf-mirror.example/THUDM/{name}",
                               seafile_url="https://seafile.lan/"))
    src = source_for(s, "int4")
    assert src["model_revision"] == other and src["code_revision"] == COMMIT
    assert src["model_url"] == "https://hf-mirror.example/THUDM/chatglm-6b-int4"
    assert src["share"] == "https://seafile.lan/d/674208019e314311ab5c/"
    assert source_for(s, "int8")["model_revision"] == COMMIT


def test_every_setting_is_documented_once_with_its_default():
    """inventories/gpu.py documents each setting with the default settings.py gives it."""
    import ast
    from dataclasses import fields

    from operations.settings import ROOT, Settings

    doc = ast.get_docstring(ast.parse((ROOT / "inventories" / "gpu.py").read_text()))
    for field in fields(Settings):
        if field.name == "host":
            continue
        assert f"\n    {field.name}" in doc or f", {field.name}" in doc, field.name
        if isinstance(field.default, bool):
            assert f"{field.name}={field.default}" in doc, field.name
