"""operations/preflight.py against real git repositories on this machine (file:// remotes),
the Seafile stand-in and a plain HTTP server on loopback."""

import hashlib
import shutil
import subprocess
import threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import pytest

from lab.seafile import SeafileStandIn
from operations import preflight
from operations.settings import SettingError


def git(cwd, *args):
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True,
                          text=True).stdout.strip()


@pytest.fixture
def remote(tmp_path):
    """A repo of two commits; the first is no branch tip (as a pinned, older model commit)."""
    src = tmp_path / "remote"
    src.mkdir()
    git(src, "init", "-q")
    git(src, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "--allow-empty", "-m", "a")
    old = git(src, "rev-parse", "HEAD")
    git(src, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "--allow-empty", "-m", "b")
    preflight._done.clear()
    return f"file://{src}", old


def test_a_commit_the_remote_has_passes_and_is_remembered(remote, tmp_path):
    url, old = remote
    cache = tmp_path / "cache"
    assert preflight.check_revision("h1", "model_revision", url, old, cache) == ""
    # Found once, it is listed as confirmed: no remote needed any more.
    shutil.rmtree(url[len("file://"):])
    preflight._done.clear()
    assert preflight.check_revision("h1", "model_revision", url, old, cache) == ""


def test_a_commit_the_remote_lacks_names_host_setting_and_fix(remote, tmp_path):
    url, _ = remote
    with pytest.raises(SettingError) as error:
        preflight.check_revision("h7", "model_revisions['int4']", url, "0" * 40, tmp_path / "c")
    text = str(error.value)
    assert text.startswith(f"host 'h7': setting \"model_revisions['int4']\" = '{'0' * 40}': "
                           f"{url} has no such commit. Fix: pin a commit the remote has")


def test_an_unreachable_remote_is_a_warning_not_a_stop(tmp_path):
    preflight._done.clear()
    warning = preflight.check_revision("h1", "code_revision", f"file://{tmp_path}/none",
                                       "1" * 40, tmp_path / "c")
    assert warning.startswith(f"could not ask file://{tmp_path}/none for 111111111111")
    assert warning.endswith("the host's clone checks it")


def test_ssh_keys_are_checked_per_host(tmp_path):
    key = tmp_path / "id"
    key.write_text("k")
    preflight.check_ssh_keys([("a", {"ssh_key": str(key)}), ("b", {})])
    with pytest.raises(SettingError, match="host 'c': setting 'ssh_key' = .* names no file"):
        preflight.check_ssh_keys([("a", {}), ("c", {"ssh_key": str(tmp_path / "gone")})])


def test_hosts_collected_together_check_a_commit_once_and_a_rerun_not_at_all(remote, tmp_path, monkeypatch):
    """pyinfra collects hosts in parallel greenlets: the first asks git, the others wait for
    its answer; the confirmed commit is listed, so a later run (a new process) runs no git."""
    import gevent

    url, old = remote
    cache = tmp_path / "cache"
    calls = []
    real_run = preflight.subprocess.run

    def counting_run(args, **kwargs):
        calls.append(args)
        gevent.sleep(0.01)  # as a real subprocess yields to the other greenlets
        return real_run(args, **kwargs)

    monkeypatch.setattr(preflight.subprocess, "run", counting_run)
    jobs = [gevent.spawn(preflight.check_revision, f"h{i}", "model_revision", url, old, cache)
            for i in range(8)]
    gevent.joinall(jobs)
    assert [job.value for job in jobs] == [""] * 8
    assert len(calls) == 3  # init, cat-file, fetch: once for all eight
    preflight._done.clear()
    calls.clear()
    assert preflight.check_revision("h1", "model_revision", url, old, cache) == ""
    assert calls == []


def lfs_pointer(data: bytes) -> str:
    return (f"version https://git-lfs.github.com/spec/v1\noid sha256:"
            f"{hashlib.sha256(data).hexdigest()}\nsize {len(data)}\n")


@pytest.fixture
def model_remote(tmp_path):
    """A model repo whose weights are LFS pointers, as Hugging Face serves them."""
    src = tmp_path / "model"
    src.mkdir()
    (src / "config.json").write_text("{}\n")
    (src / "pytorch_model.bin").write_text(lfs_pointer(b"w" * 1000))
    (src / "ice_text.model").write_text(lfs_pointer(b"t" * 10))
    git(src, "init", "-q")
    git(src, "add", ".")
    git(src, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "a")
    preflight._done.clear()
    return f"file://{src}", git(src, "rev-parse", "HEAD")


def test_pointers_of_a_pinned_commit_are_read_once_and_kept(model_remote, tmp_path):
    url, commit = model_remote
    cache = tmp_path / "cache"
    pointers = preflight.check_revision("h1", "model_revision", url, commit, cache, pointers=True)
    assert pointers == {
        "pytorch_model.bin": {"oid": hashlib.sha256(b"w" * 1000).hexdigest(), "size": 1000},
        "ice_text.model": {"oid": hashlib.sha256(b"t" * 10).hexdigest(), "size": 10}}
    shutil.rmtree(url[len("file://"):])
    preflight._done.clear()
    assert preflight.check_revision("h2", "model_revision", url, commit, cache,
                                    pointers=True) == pointers


RACE = """
from gevent import monkey; monkey.patch_all()
import sys, gevent
from pathlib import Path
from operations import preflight
from operations.settings import SettingError
murl, mcommit, curl, cold, base = sys.argv[1:]
for run in range(10):
    preflight._done.clear()
    cache = Path(base) / str(run)  # fresh every time
    jobs = [gevent.spawn(preflight.check_revision, "h1", "model_revision", murl, mcommit, cache, True),
            gevent.spawn(preflight.check_revision, "h2", "code_revision", curl, cold, cache),
            gevent.spawn(preflight.check_revision, "h3", "model_revision", murl, "e" * 40, cache, True)]
    gevent.joinall(jobs)
    assert jobs[1].value == "", jobs[1].value
    assert set(jobs[0].value) == {"pytorch_model.bin", "ice_text.model"}, jobs[0].value
    assert isinstance(jobs[2].exception, SettingError), (jobs[2].value, jobs[2].exception)
print("ok")
"""


def test_three_hosts_three_commits_in_parallel_are_each_exact(model_remote, remote, tmp_path):
    """Greenlets (as pyinfra collects hosts, subprocess patched by gevent) asking for commits
    of two remotes at once into a fresh cache, ten times: every answer is exact, the missing
    commit always stops."""
    import sys

    (murl, mcommit), (curl, cold) = model_remote, remote
    run = subprocess.run([sys.executable, "-c", RACE, murl, mcommit, curl, cold, str(tmp_path / "c")],
                         cwd=preflight.Path(preflight.__file__).parents[1], capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr[-3000:]


SHARE_NAMES = {"share": "weights_share", "folder": "weights_share_path",
               "model_revision": "model_revisions['int4']"}


@pytest.fixture
def share(tmp_path):
    folder = tmp_path / "share" / "chatglm-6b-int4"
    folder.mkdir(parents=True)
    (folder / "pytorch_model.bin").write_bytes(b"w" * 1000)
    (folder / "ice_text.model").write_bytes(b"t" * 10)
    server = SeafileStandIn(shares={"abc123": tmp_path / "share"}).start()
    preflight._done.clear()
    yield f"{server.url}/d/abc123/", folder
    server.stop()


POINTERS = {"pytorch_model.bin": {"oid": hashlib.sha256(b"w" * 1000).hexdigest(), "size": 1000},
            "ice_text.model": {"oid": hashlib.sha256(b"t" * 10).hexdigest(), "size": 10}}


def share_error(*args) -> str:
    with pytest.raises(SettingError) as info:
        preflight.check_share("h1", SHARE_NAMES, *args)
    return str(info.value)


def test_a_share_holding_the_pinned_weights_passes(share):
    link, _ = share
    preflight.check_share("h1", SHARE_NAMES, link, "/chatglm-6b-int4/", POINTERS, {})


def test_share_faults_name_the_setting_and_the_fix(share):
    link, folder = share
    wrong_token = link.replace("abc123", "0000")
    assert share_error(wrong_token, "/chatglm-6b-int4/", POINTERS, {}).startswith(
        f"host 'h1': setting 'weights_share' = '{wrong_token}' does not answer as a Seafile "
        "share link: listing '/' of")
    assert "HTTP 404" in share_error(wrong_token, "/chatglm-6b-int4/", POINTERS, {})
    assert share_error(link, "/chatglm-6b-int3/", POINTERS, {}).startswith(
        "host 'h1': setting 'weights_share_path' = '/chatglm-6b-int3/' is not a folder of")
    (folder / "ice_text.model").unlink()
    assert share_error(link, "/chatglm-6b-int4/", POINTERS, {}) == (
        "host 'h1': setting 'weights_share_path' = '/chatglm-6b-int4/': the share's folder has "
        "no ice_text.model (it holds: pytorch_model.bin). Fix: point weights_share_path (or "
        "weights_share) at the folder that holds this model's weight files")
    preflight._done.clear()
    (folder / "ice_text.model").write_bytes(b"t" * 11)
    assert share_error(link, "/chatglm-6b-int4/", POINTERS, {}) == (
        "host 'h1': setting 'weights_share' holds /chatglm-6b-int4/ice_text.model of 11 bytes, "
        "but the LFS pointer at the pinned revision says 10. Fix: use the share of the weights "
        "of that revision, or pin the revision (model_revisions['int4']) those weights belong to")


def test_a_pointer_other_than_the_reviewed_sha256_stops(share):
    link, _ = share
    message = share_error(link, "/chatglm-6b-int4/", POINTERS, {"pytorch_model.bin": "0" * 64})
    assert message.startswith("host 'h1': setting \"model_revisions['int4']\" gives "
                              "pytorch_model.bin the sha256 ")


@pytest.fixture
def www(tmp_path):
    (tmp_path / "www" / "simple" / "torch").mkdir(parents=True)
    (tmp_path / "www" / "simple" / "torch" / "index.html").write_text(
        '<a href="torch-2.6.0%2Bcu124-cp311-cp311-linux_x86_64.whl">t</a>')
    (tmp_path / "www" / "m").mkdir()
    (tmp_path / "www" / "m" / "pytorch_model.bin").write_bytes(b"w" * 1000)
    (tmp_path / "www" / "m" / "ice_text.model").write_bytes(b"t" * 9)
    handler = partial(SimpleHTTPRequestHandler, directory=str(tmp_path / "www"))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    preflight._done.clear()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def url_error(*args) -> str:
    with pytest.raises(SettingError) as info:
        preflight.check_url("h1", *args)
    return str(info.value)


def test_indexes_and_installers_answer_or_stop(www):
    preflight.check_url("h1", "torch_index_url", f"{www}/simple/torch/", "torch-2.6.0+cu124")
    assert url_error("torch_index_url", f"{www}/simple/torch/", "torch-2.8.0+cu128") == (
        f"host 'h1': setting 'torch_index_url' leads to {www}/simple/torch/, whose page lists no "
        "torch-2.8.0+cu128. Fix: point torch_index_url at an index that serves it")
    assert url_error("conda_installer_url", f"{www}/nothing.sh") == (
        f"host 'h1': setting 'conda_installer_url' leads to {www}/nothing.sh, which answers "
        "HTTP 404. Fix: correct conda_installer_url so that it serves this file or index")
    closed = "http://127.0.0.1:9/simple/"
    assert url_error("pip_index_url", closed).startswith(
        f"host 'h1': setting 'pip_index_url' leads to {closed}, which cannot be reached from "
        "this machine (ConnectionError")
    assert url_error("pip_index_url", closed).endswith(
        "Fix: correct pip_index_url, or set check_sources=False if only the hosts can reach it")


def test_mirror_files_answer_with_the_pointer_sizes(www):
    preflight.check_mirror("h1", f"{www}/m/", {"pytorch_model.bin": POINTERS["pytorch_model.bin"]})
    with pytest.raises(SettingError, match="setting 'weights_mirror' serves .*/m/ice_text.model "
                       "with 9 bytes, but the LFS pointer at the pinned revision says 10"):
        preflight.check_mirror("h1", f"{www}/m/", POINTERS)
    with pytest.raises(SettingError, match="which answers HTTP 404"):
        preflight.check_mirror("h1", f"{www}/none/", POINTERS)
