"""The offline package index: fill() picks target wheels, write_index() is PEP 503, pip uses it."""

import hashlib
import os
import re
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import requests

from lab.pyindex import check_wheels, fill, platform_tags, serve_static, write_index

ROOT = Path(__file__).resolve().parents[1]
PINS = {"six": "1.17.0", "packaging": "26.3"}
NO_PIP = ("/bin/false",)  # proves a call needs no pip run at all
OPT_TORCH = Path("/opt/wheels/torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    base = tmp_path_factory.mktemp("pyindex")
    req = base / "requirements.txt"
    req.write_text("".join(f"{name}=={version}  # pinned\n" for name, version in PINS.items()))
    report = fill(req, base / "wheels", extra_find_links=())
    write_index(base / "wheels", base / "index")
    return base, req, report


def isolated_pip_env():
    # The machine's pip config adds find-links and extra indexes; they must not help here.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env["PIP_CONFIG_FILE"] = os.devnull
    return env


def test_platform_tags_cover_older_glibc():
    tags = platform_tags("manylinux_2_28_x86_64")
    assert tags[0] == "manylinux_2_28_x86_64"
    for tag in ["manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux2010_x86_64",
                "manylinux1_x86_64", "manylinux_2_5_x86_64"]:
        assert tag in tags
    assert "manylinux_2_31_x86_64" not in tags


def test_fill_downloads_pure_wheels(built):
    base, _req, report = built
    names = sorted(os.listdir(base / "wheels"))
    assert names == ["packaging-26.3-py3-none-any.whl", "six-1.17.0-py2.py3-none-any.whl"]
    assert report["downloaded"] == names and report["from_sdist"] == []


def test_fill_again_skips_present_without_pip(built):
    base, req, _ = built
    t0 = time.monotonic()
    report = fill(req, base / "wheels", extra_find_links=(), pip_cmd=NO_PIP)
    assert time.monotonic() - t0 < 1
    assert sorted(report["present"]) == sorted(os.listdir(base / "wheels"))
    assert report["downloaded"] == []


def test_index_layout_and_sha256(built):
    base, _, _ = built
    index = base / "index"
    root = (index / "simple" / "index.html").read_text()
    assert re.findall(r'href="([^"]+)"', root) == ["packaging/", "six/"]
    for name in PINS:
        page = (index / "simple" / name / "index.html").read_text()
        links = re.findall(r'href="\.\./\.\./files/([^"#]+)#sha256=([0-9a-f]{64})"', page)
        assert len(links) == 1
        filename, digest = links[0]
        served = index / "files" / filename
        assert hashlib.sha256(served.read_bytes()).hexdigest() == digest
        assert served.read_bytes() == (base / "wheels" / filename).read_bytes()
    assert 'data-requires-python="&gt;=3.' in (index / "simple" / "packaging" / "index.html").read_text()


def test_pip_installs_from_served_index(built, tmp_path):
    base, _, _ = built
    server = serve_static(base / "index")
    try:
        def pip_install(spec):
            return subprocess.run(
                [sys.executable, "-m", "pip", "install", "--no-cache-dir", "--no-deps",
                 "--index-url", f"{server.url}/simple/", "--target", str(tmp_path / "t"), spec],
                env=isolated_pip_env(), capture_output=True, text=True, timeout=120)

        done = pip_install(f"six=={PINS['six']}")
        assert done.returncode == 0, done.stdout + done.stderr
        assert (tmp_path / "t" / "six.py").exists()
        assert ("GET", f"/files/six-{PINS['six']}-py2.py3-none-any.whl", 200) in server.hits
        missing = pip_install("requests")  # not in the index, and nothing else to fall back on
        assert missing.returncode != 0
    finally:
        server.stop()


def test_serve_static_folder_answers_with_index_html(built):
    base, _, _ = built
    server = serve_static(base / "index")
    try:
        page = requests.get(f"{server.url}/simple/six/")
        assert page.status_code == 200 and "six-1.17.0" in page.text
        moved = requests.get(f"{server.url}/simple/six", allow_redirects=False)
        assert moved.status_code == 301 and moved.headers["Location"].endswith("/simple/six/")
        assert requests.get(f"{server.url}/simple/nope/").status_code == 404
    finally:
        server.stop()


def fake_wheel(folder, name, size=10):
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / name, "wb") as f:
        f.truncate(size)  # sparse: big files cost nothing
    return folder / name


def test_torch_comes_from_cpu_wheel_not_pip(tmp_path):
    links = tmp_path / "links"
    fake_wheel(links, "torch-2.13.0-cp311-cp311-manylinux_2_28_x86_64.whl")  # a CUDA-like one
    fake_wheel(links, "torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl")
    fake_wheel(links, "torch-2.14.0+cpu-cp312-cp312-manylinux_2_28_x86_64.whl")  # wrong python
    req = tmp_path / "req.txt"
    for spec in ["torch==2.13.0", "torch>=2.0"]:
        req.write_text(spec + "\n")
        report = fill(req, tmp_path / f"w{len(spec)}", extra_find_links=[links], pip_cmd=NO_PIP)
        assert report["torch"] == "torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl"
    req.write_text("torch==2.12.0\n")
    with pytest.raises(RuntimeError, match="refusing"):
        fill(req, tmp_path / "w", extra_find_links=[links], pip_cmd=NO_PIP)


@pytest.mark.skipif(not OPT_TORCH.exists(), reason="no /opt/wheels torch on this machine")
def test_torch_pin_takes_the_machines_cpu_build(tmp_path):
    req = tmp_path / "req.txt"
    req.write_text("torch==2.13.0\n")
    report = fill(req, tmp_path / "wheels", pip_cmd=NO_PIP)
    assert report["torch"] == OPT_TORCH.name
    assert (tmp_path / "wheels" / OPT_TORCH.name).stat().st_size == OPT_TORCH.stat().st_size


@pytest.mark.parametrize("name,size", [
    ("torch-2.13.0-cp311-cp311-manylinux_2_28_x86_64.whl", 600 << 20),
    ("torch-2.13.0-cp311-cp311-manylinux_2_28_x86_64.whl", 10),
    ("nvidia_cublas_cu12-12.8.4.1-py3-none-manylinux_2_27_x86_64.whl", 10),
])
def test_check_wheels_refuses_cuda_builds(tmp_path, name, size):
    fake_wheel(tmp_path, name, size)
    with pytest.raises(RuntimeError, match=re.escape(name)):
        check_wheels(tmp_path)


def test_pure_sdist_becomes_a_wheel(tmp_path):
    src = tmp_path / "labpure-0.1"
    (src / "labpure").mkdir(parents=True)
    (src / "labpure" / "__init__.py").write_text("X = 1\n")
    (src / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["setuptools"]\nbuild-backend = "setuptools.build_meta"\n'
        '[project]\nname = "labpure"\nversion = "0.1"\n')
    links = tmp_path / "links"
    links.mkdir()
    with tarfile.open(links / "labpure-0.1.tar.gz", "w:gz") as tar:
        tar.add(src, arcname="labpure-0.1")
    req = tmp_path / "req.txt"
    req.write_text("labpure==0.1\n")
    report = fill(req, tmp_path / "wheels", extra_find_links=[links])
    assert report["from_sdist"] == ["labpure-0.1-py3-none-any.whl"]
    assert os.listdir(tmp_path / "wheels") == ["labpure-0.1-py3-none-any.whl"]


def test_cli_serve_prints_port_and_stops(built, tmp_path):
    base, _, _ = built
    proc = subprocess.Popen([sys.executable, "-m", "lab.pyindex", "serve", "--dir",
                             str(base / "index"), "--port", "0"],
                            cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        port = int(proc.stdout.readline())
        assert requests.get(f"http://127.0.0.1:{port}/simple/").status_code == 200
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
