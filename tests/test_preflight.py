"""operations/preflight.py against real git repositories on this machine (file:// remotes)."""

import subprocess

import pytest

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
    preflight._known.clear()
    return f"file://{src}", old


def test_a_commit_the_remote_has_passes_and_is_remembered(remote, tmp_path):
    url, old = remote
    cache = tmp_path / "cache"
    assert preflight.check_revision("h1", "model_revision", url, old, cache) == ""
    # Found once, it is in the control-side repo: no remote needed any more.
    preflight._known.clear()
    assert preflight.check_revision("h1", "model_revision", "file:///nowhere", old, cache) == ""


def test_a_commit_the_remote_lacks_names_host_setting_and_fix(remote, tmp_path):
    url, _ = remote
    with pytest.raises(SettingError) as error:
        preflight.check_revision("h7", "model_revisions['int4']", url, "0" * 40, tmp_path / "c")
    text = str(error.value)
    assert text.startswith(f"host 'h7': setting \"model_revisions['int4']\" = '{'0' * 40}': "
                           f"{url} has no such commit. Fix: pin a commit the remote has")


def test_an_unreachable_remote_is_a_warning_not_a_stop(tmp_path):
    preflight._known.clear()
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
    preflight._known.clear()
    calls.clear()
    assert preflight.check_revision("h1", "model_revision", url, old, cache) == ""
    assert calls == []
