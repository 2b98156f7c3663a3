"""operations/hostlock.py's shell run for real on this machine (sh, flock, /proc), and the
report's handling of interrupted runs and of result files this run did not confirm.

The lock's owner in these tests is a small Python process standing for the SSH
connection's sshd: it runs the command through sh, prints its output and stays alive as
long as told; the holder must end when it does.
"""

import json
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest

from operations import hostlock, report
from operations.checks import settings_for
from operations.settings import SettingError
from tests.spec_harness import FakeDataHost

OWNER = """
import subprocess, sys, time
out = subprocess.run(["sh", "-c", sys.argv[1]], capture_output=True, text=True).stdout
print(out, flush=True)
time.sleep(float(sys.argv[2]))
"""
INFO = {"run": "0123abcd", "started": "2026-12-05T03:04:05Z", "from": "ctl-1"}
OTHER = {"run": "feedbeef", "started": "2026-12-05T03:09:00Z", "from": "ctl-2"}


def owner(command: str, seconds: float) -> tuple[subprocess.Popen, dict]:
    """A process that runs command through sh and lives `seconds` more; its parsed answer."""
    proc = subprocess.Popen([sys.executable, "-c", OWNER, command, str(seconds)],
                            stdout=subprocess.PIPE, text=True)
    return proc, hostlock.parse([proc.stdout.readline().rstrip("\n")])


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def wait_gone(pid: int, timeout: float = 5) -> float:
    t0 = time.time()
    while alive(pid):
        assert time.time() - t0 < timeout, f"holder {pid} still there after {timeout} s"
        time.sleep(0.05)
    return time.time() - t0


def check(path) -> dict:
    return hostlock.parse(subprocess.run(["sh", "-c", hostlock.check_command(str(path))],
                                         capture_output=True, text=True).stdout.splitlines())


def test_one_holder_at_a_time_and_the_holder_ends_with_its_connection(tmp_path):
    lock = tmp_path / "run lock" / "chatglm deploy.lock"  # a space: the path is quoted
    first, got = owner(hostlock.take_command(INFO, str(lock)), 30)
    try:
        assert got["state"] == "taken" and alive(got["pid"]), got
        assert lock.read_text() == f"run=0123abcd started=2026-12-05T03:04:05Z from=ctl-1 pid={got['pid']}\n"
        # A second run, and a --dry check, see who holds it; the file is left as it was.
        t0 = time.time()
        second, busy = owner(hostlock.take_command(OTHER, str(lock)), 0)
        second.wait()
        assert busy == {"state": "busy", "holder": {"run": "0123abcd", "started": "2026-12-05T03:04:05Z",
                                                    "from": "ctl-1", "pid": str(got["pid"])}}
        assert time.time() - t0 < 5
        assert check(lock)["state"] == "busy"
        assert lock.read_text().startswith("run=0123abcd ")
    finally:
        first.kill()  # the connection ends (the deploy SIGKILLed, the network gone)
        first.wait()
    assert wait_gone(got["pid"]) < 2.5
    assert check(lock) == {"state": "free"}
    again, taken = owner(hostlock.take_command(OTHER, str(lock)), 0)
    again.wait()
    assert taken["state"] == "taken"
    wait_gone(taken["pid"])


def test_dry_check_writes_nothing(tmp_path):
    lock = tmp_path / "none" / "deploy.lock"
    assert check(lock) == {"state": "free"}
    assert not (tmp_path / "none").exists()


def test_a_lock_that_cannot_be_opened_is_an_error_not_a_pass(tmp_path):
    (tmp_path / "file").write_text("")  # a file where the lock's directory should be
    got = hostlock.parse(subprocess.run(
        ["sh", "-c", hostlock.take_command(INFO, str(tmp_path / "file" / "x.lock"))],
        capture_output=True, text=True).stdout.splitlines())
    assert got["state"] == "error" and "cannot open" in got["error"], got


def test_busy_message_names_the_run_the_host_and_the_fix():
    holder = {"run": "0123abcd", "started": "2026-12-05T03:04:05Z", "from": "ctl-1", "pid": "77"}
    assert hostlock.busy_message("h1", holder) == (
        "host 'h1': another deploy is running here (started 2026-12-05 03:04:05 UTC from ctl-1, "
        "run 0123abcd); wait for it, or remove /run/lock/chatglm-deploy.lock if that run is gone")
    assert hostlock.parse(["noise", "@@chatglm-lock taken 42"]) == {"state": "taken", "pid": 42}
    assert hostlock.parse([])["state"] == "unknown"


# --- the report ---------------------------------------------------------------------------

def _result(host="h1", ok=True):
    return {"variant": "int4", "device": "cpu", "ok": ok, "load_s": 1.0, "host": host,
            "answers": [], "tokens_per_s": 9.0}


class _Host:
    def __init__(self, name):
        self.name = name


def _run_state(ops: dict, order: list, executing=True):
    hosts = [_Host(n) for n in ops]
    return SimpleNamespace(
        is_executing=executing, inventory=hosts, is_host_in_limit=lambda h: True,
        ops={h: {op: None for op in ops[h.name]} for h in hosts},
        get_op_order=lambda: order,
        get_op_meta=lambda op: SimpleNamespace(names={f"Stage {op}"}),
        get_op_data_for_host=lambda host, op: None), hosts


def test_interrupted_hosts_are_marked_at_their_operation_and_finished_ones_are_not(tmp_path):
    (tmp_path / "hosts").mkdir()
    for name in ("a", "b", "c", "d"):  # left by earlier runs (other machines of these names)
        (tmp_path / "hosts" / f"{name}.json").write_text(json.dumps(_result(f"old-{name}")))
    state, (a, b, c, d) = _run_state({"a": ["1", "2"], "b": ["1", "2"], "c": ["1", "2"],
                                      "d": ["1", "2"]}, ["1", "2"])
    fleet = report.FleetReport(tmp_path, hosts=4)
    for h in (a, b, c, d):
        fleet.operation_host_start(state, h, "1")
    for h in (a, b, c):
        fleet.operation_host_success(state, h, "1")
    fleet.operation_host_start(state, a, "2")
    fleet.operation_host_success(state, a, "2")  # a finished
    fleet.confirm("a")
    fleet.operation_host_start(state, b, "2")    # b in op 2; c between 1 and 2; d in op 1
    fleet.interrupted(state, "SIGINT")
    data = json.loads((tmp_path / "fleet.json").read_text())
    assert "a" not in data["failed"] and data["hosts"]["a"]["host"] == "old-a"
    assert {n: (f["stage"], f["interrupted"]) for n, f in data["failed"].items()} == {
        "b": ("Stage 2", True), "c": ("Stage 2", True), "d": ("Stage 1", True)}
    # No host shows figures this run did not confirm.
    assert data["hosts"]["b"] == data["hosts"]["c"] == data["hosts"]["d"] == {}
    md = (tmp_path / "fleet.md").read_text()
    assert "| b | - | - |" in md and "| INTERRUPTED (Stage 2) |" in md
    assert "| d | Stage 1 (interrupted) | the deploy was interrupted (SIGINT) |" in md
    # The disconnect that follows does not write it again over the interrupted one.
    fleet.host_disconnect(state, a)
    assert json.loads((tmp_path / "fleet.json").read_text()) == data


def test_interrupted_before_any_operation(tmp_path):
    state, _ = _run_state({"a": ["1"]}, ["1"], executing=False)
    fleet = report.FleetReport(tmp_path, hosts=1)
    fleet.interrupted(state, "SIGTERM")
    failed = json.loads((tmp_path / "fleet.json").read_text())["failed"]["a"]
    assert failed == {"stage": "before the first operation",
                      "error": "the deploy was interrupted (SIGTERM)", "interrupted": True}


def test_result_files_count_only_when_confirmed(tmp_path):
    (tmp_path / "hosts").mkdir()
    (tmp_path / "hosts" / "a.json").write_text(json.dumps(_result("a")))
    (tmp_path / "hosts" / "b.json").write_text(json.dumps(_result("someone-else")))
    report.write(tmp_path, {}, ["a", "b"], confirmed={"a"})
    data = json.loads((tmp_path / "fleet.json").read_text())
    assert data["hosts"]["a"]["host"] == "a" and data["hosts"]["b"] == {}
    assert "| b | - | - | - | - | - | - | - | - | no smoke result |" in (tmp_path / "fleet.md").read_text()


# --- path settings ----------------------------------------------------------------------

@pytest.mark.parametrize("setting,value,word", [
    ("install_dir", "/opt/chat\nglm", "'\\n'"),
    ("weights_cache", "/tmp/a\\b", "'\\\\'"),
    ("report_dir", "rep\torts", "'\\t'"),
])
def test_paths_that_cannot_work_are_refused(setting, value, word):
    with pytest.raises(SettingError) as error:
        settings_for(FakeDataHost("h1", {"python_backend": "venv", setting: value}))
    assert str(error.value) == (f"host 'h1': setting {setting!r} = {value!r} contains {word}. "
                                "Fix: use a path without control characters or backslashes")


def test_a_conda_prefix_with_a_space_is_refused_and_a_venv_one_is_not():
    with pytest.raises(SettingError) as error:
        settings_for(FakeDataHost("h1", {"python_backend": "conda", "install_dir": "/opt/chat glm"}))
    assert str(error.value).startswith("host 'h1': setting 'install_dir' = '/opt/chat glm' puts "
                                       "conda in '/opt/chat glm/conda', a path with a space")
    assert "Fix: set conda_dir to a path without spaces" in str(error.value)
    s = settings_for(FakeDataHost("h1", {"python_backend": "conda", "install_dir": "/opt/chat glm",
                                         "conda_dir": "/opt/conda"}))
    assert s.conda_prefix == "/opt/conda"
    s = settings_for(FakeDataHost("h1", {"python_backend": "venv", "install_dir": "/opt/it's $x *"}))
    assert s.venv == "/opt/it's $x */venv"
