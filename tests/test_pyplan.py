"""The Python settings and plan (operations/pyplan.py): bad data stops the run naming host,
setting and fix; the plan picks Python, torch build and index from the GPU plan."""

import pytest

from operations.pyplan import lock_path, python_data, python_plan, read_lock, tag_cuda
from operations.resolver import GpuPlan, resolve
from operations.checks import settings_for
from operations.settings import SettingError, load_toml
from tests.test_gpu_specs import GPUS, FakeDataHost

HOST = "py-test"
CPU = GpuPlan()


def settings(**data):
    return settings_for(FakeDataHost(HOST, data))


def plan_for(os_id="ubuntu-22.04", gpu="H100", **pins):
    return resolve(HOST, [GPUS[gpu]], os_id, pins)


def error(**data) -> str:
    with pytest.raises(SettingError) as info:
        settings(**data)
    text = str(info.value)
    assert HOST in text and "Fix:" in text, text
    return text


def test_defaults_are_conda_with_the_newest_python_lock_and_torch_share():
    py = python_plan(settings(), CPU)
    assert py.backend == "conda" and py.python_version == "3.11"
    assert py.env == "/opt/chatglm/conda/envs/chatglm" and py.python.endswith("/bin/python")
    assert py.torch == "2.13.0+cpu" and py.torch_index == "https://download.pytorch.org/whl/cpu"
    assert py.conda.installer == "miniforge" and py.conda.channels == ["conda-forge"]
    assert py.conda.url.endswith("Miniforge3-24.11.3-0-Linux-x86_64.sh")
    assert not [l for l in py.lock_text.splitlines() if l.startswith("torch")]
    assert "transformers" in py.pins


@pytest.mark.parametrize("cuda,torch", [("11.8", "2.7.1+cu118"), ("12.1", "2.5.1+cu121"),
                                        ("12.4", "2.6.0+cu124"), ("13.0", "2.11.0+cu130")])
def test_torch_build_follows_the_resolved_cuda(cuda, torch):
    py = python_plan(settings(cuda_version=cuda), plan_for(cuda_version=cuda))
    tag = "cu" + cuda.replace(".", "")
    assert py.torch == torch and py.torch_index.endswith(f"/whl/{tag}")
    assert py.torch_deps is True and py.expect_cuda == cuda and py.gpu is True


def test_every_torch_tag_of_the_compat_table_has_a_build():
    builds = python_data()["torch"]["builds"]
    tags = {row["torch_tag"] for row in load_toml("compat.toml")["cuda"].values()} | {"cpu"}
    assert tags <= set(builds), tags - set(builds)
    for tag in tags - {"cpu"}:
        assert builds[tag]["version"] and tag_cuda(tag)


def test_cuda_117_torch_limits_the_conda_python():
    # torch 2.0.1 (cu117) has wheels up to 3.11 only; the lock is 3.11: still 3.11.
    py = python_plan(settings(cuda_version="11.7"), plan_for("ubuntu-20.04", "A100", cuda_version="11.7"))
    assert py.torch == "2.0.1+cu117" and py.python_version == "3.11"


def test_lock_files_in_the_repo():
    cpu = read_lock(lock_path("chatglm-cpu"))
    assert cpu["torch"] == "2.13.0" and cpu["pythons"] == ["3.11"]
    assert cpu["pins"]["transformers"] == "4.33.3" and cpu["pins"]["tokenizers"] == "0.13.3"
    sys312 = read_lock(lock_path("chatglm-py312-system-torch"))
    assert sys312["torch"] is None and sys312["pythons"] == ["3.12"]
    pins = sys312["pins"]
    assert (pins["transformers"], pins["tokenizers"], pins["cpm-kernels"]) == ("4.40.2", "0.19.1", "1.0.11")
    assert int(pins["setuptools"].split(".")[0]) < 81 and "huggingface-hub" in pins
    assert {"sentencepiece", "accelerate", "protobuf"} <= set(pins)


def test_py312_system_torch_plan():
    s = settings(python_backend="venv", requirements="chatglm-py312-system-torch",
                 venv_system_site_packages=True)
    py = python_plan(s, plan_for("ubuntu-24.04"))
    assert py.torch is None and py.system_site_packages and py.pythons == ["3.12"]
    assert py.env == "/opt/chatglm/venv" and py.expect_cuda == "13.0"


def test_mirrors_and_installer_overrides():
    s = settings(pip_index_url="https://pypi.tuna.tsinghua.edu.cn/simple",
                 conda_mirror="https://mirrors.tuna.tsinghua.edu.cn/anaconda/",
                 torch_index_url="https://mirror.example/whl/{tag}",
                 conda_installer_url="https://mirrors.tuna.tsinghua.edu.cn/github-release/"
                 "conda-forge/miniforge/LatestRelease/Miniforge3-24.11.3-0-Linux-x86_64.sh")
    py = python_plan(s, CPU)
    assert py.conda.mirror == "https://mirrors.tuna.tsinghua.edu.cn/anaconda"
    assert py.conda.sha256 == python_data()["conda"]["installers"]["miniforge"]["sha256"]
    assert py.torch_index == "https://mirror.example/whl/cpu" and py.trusted_host == ""
    http = python_plan(settings(pip_index_url="http://10.0.0.5:3141/root/pypi/+simple/"), CPU)
    assert http.trusted_host == "10.0.0.5"


@pytest.mark.parametrize("data,words", [
    ({"python_backend": "pip"}, ["python_backend", "'conda'", "'venv'"]),
    ({"pip_index_url": "https://pypi.tuna.tsinghua.edu.cn"}, ["pip_index_url", "simple"]),
    ({"pip_index_url": "pypi.tuna.tsinghua.edu.cn/simple"}, ["pip_index_url", "not a valid URL"]),
    ({"torch_index_url": "https://download.pytorch.org/whl/{cuda}"}, ["torch_index_url", "{tag}"]),
    ({"torch_version": "latest"}, ["torch_version", "2.5.1"]),
    ({"conda_installer": "anaconda"}, ["conda_installer", "miniforge, miniconda"]),
    ({"conda_installer_url": "https://mirror.example/Miniforge3-25.1.1-0-Linux-x86_64.sh"},
     ["conda_installer_sha256", "is needed", "Miniforge3-25.1.1-0-Linux-x86_64.sh"]),
    ({"conda_installer_sha256": "abc"}, ["conda_installer_sha256", "64"]),
    ({"conda_mirror": "mirrors.tuna.tsinghua.edu.cn/anaconda"}, ["conda_mirror", "not a valid URL"]),
    ({"conda_channels": "conda-forge, bad channel"}, ["conda_channels", "'bad channel'"]),
    ({"conda_dir": "/opt"}, ["conda_dir", "of its own"]),
    ({"conda_dir": "relative/conda"}, ["conda_dir"]),
    ({"python_version": "3.12"}, ["python_version", "3.11"]),
    ({"python_version": "311"}, ["python_version", "minor version"]),
    ({"python_backend": "venv", "python_version": "3.11"}, ["python_version", "python='python3.11'"]),
    ({"python": "python3; rm -rf /"}, ["python", "interpreter"]),
    ({"requirements": "chatglm-gpu"}, ["requirements", "no lock file"]),
    ({"requirements": "locks/mine.txt"}, ["requirements", "relative path"]),
    ({"python_backend": "venv", "requirements": "chatglm-py312-system-torch"},
     ["requirements", "no torch pin", "venv_system_site_packages=True"]),
    ({"requirements": "chatglm-py312-system-torch", "venv_system_site_packages": True},
     ["venv_system_site_packages", "python_backend='venv'"]),
    ({"venv_system_site_packages": "yes"}, ["venv_system_site_packages", "True"]),
])
def test_bad_python_settings_name_host_setting_and_fix(data, words):
    text = error(**data)
    for word in words:
        assert word in text, text


def test_an_absolute_lock_path(tmp_path):
    lock = tmp_path / "mine.txt"
    lock.write_text("# python: 3.11\ntorch==2.13.0\nidna==3.10\n")
    py = python_plan(settings(requirements=str(lock)), CPU)
    assert py.pins == {"idna": "3.10"} and py.torch == "2.13.0+cpu"
    lock.write_text("# nothing pinned\n")
    assert "pins no package" in error(requirements=str(lock))


def test_a_cuda_tag_missing_from_the_torch_table():
    with pytest.raises(SettingError) as info:
        python_plan(settings(), GpuPlan(gpu=True, torch_tag="cu999", cuda="99.9"))
    assert "cu999" in str(info.value) and "data/python.toml" in str(info.value)
