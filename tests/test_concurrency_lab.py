"""Two deploys at once, Ctrl-C, odd paths and a changed host key, over SSH on lab hosts.

Hosts h25 and h26 are made fresh (lab.lab.renew: a new disk and host key) for each
scenario that asks for fresh hosts. Every run is the real deploy (whole, smoke test
included) through pyinfra's CLI, started in its own process group as a user's would be.

CHATGLM_REPEAT=N runs each contention scenario N times (the suite runs each once).
"""

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path
from shlex import quote as shlex_quote

import pytest

from lab import lab as labmod
from lab.lab import LAB
from tests.test_deploy_lab import totals
from tests.test_faults_lab import ANSI, kill, start, wait_for
from tests.test_model_lab import inventory as model_inventory

LOCK = "/run/lock/chatglm-deploy.lock"
LOCK_OP = "Host: one deploy at a time (lock)"
REPEAT = int(os.environ.get("CHATGLM_REPEAT", "1"))
CACHE = LAB / "cache-concurrency"
BUSY = re.compile(r"\[(h\d+)\] ERROR: host '(h\d+)': another deploy is running here \(started "
                  r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC) from (\S+), run ([0-9a-f]{8})\); wait for "
                  r"it, or remove /run/lock/chatglm-deploy\.lock if that run is gone")


def report_dir(name: str) -> Path:
    return LAB / f"reports-{name}"


def inventory(name: str, hosts: list[str], **data) -> Path:
    """Whole deploys (int4, control cache) of hosts, reporting to report_dir(name)."""
    subprocess.run(["rm", "-rf", str(report_dir(name))], check=True)
    settings = {"report_dir": str(report_dir(name)), "weights_cache": str(CACHE)}
    return model_inventory(name, {h: {"variant": "int4", **data} for h in hosts}, settings)


def fleet(name: str) -> dict:
    return json.loads((report_dir(name) / "fleet.json").read_text())


def log(inv: Path) -> str:
    return ANSI.sub("", (LAB / f"{inv.stem}.log").read_text())


def run_id(output: str) -> str:
    return re.search(r"--> Deploy run ([0-9a-f]{8}) from ", output).group(1)


def changes(output: str) -> dict:
    """{operation: hosts it changed} from pyinfra's results table."""
    table = ANSI.sub("", output).split("--> Results:")[1].split("Grand total")[0]
    rows = {}
    for line in table.splitlines()[2:]:
        match = re.match(r"\s*(.+?)\s{2,}(\d+)\s+(-|\d+)\s+(-|\d+)\s+(-|\d+)\s*$", line)
        if match:
            rows[match.group(1)] = 0 if match.group(3) == "-" else int(match.group(3))
    return rows


def unchanged(lab, inv: Path):
    """A run that exits 0 and changes nothing on any host. (Its report is new, so the smoke
    results are fetched into it: a change on the control machine only.)"""
    again = lab.deploy(inventory=inv)
    t = totals(again.stdout)
    done = {op: n for op, n in changes(again.stdout).items() if n and op != "Smoke | fetch result"}
    assert again.returncode == 0 and t["error"] == 0 and done == {}, again.stdout[-4000:]
    return again


def lock_free(lab, host: str) -> bool:
    """Nobody holds the host's deploy lock (a shared flock, as --dry checks it)."""
    return lab.ssh(host, f"[ ! -e {LOCK} ] || flock -s -n {LOCK} true", check=False).returncode == 0


def released(lab, *hosts):
    """The lock of each host is free within 3 s of the run's end (its holder looks at the
    connection once a second)."""
    for host in hosts:
        wait_for(lambda: lock_free(lab, host), f"the lock of {host} released", timeout=3)


def renew(*hosts):
    for host in hosts:
        labmod.renew(host)


def stopped_by(output: str, other: str, hosts: set[str]):
    """output stopped each of hosts at once with the message naming the run other."""
    found = {m.group(1): m for m in BUSY.finditer(ANSI.sub("", output))}
    assert set(found) == hosts, output[-5000:]
    for host, m in found.items():
        assert m.group(2) == host and m.group(5) == other, m.group(0)


def worked_once(reports: dict, hosts: set[str]):
    """Exactly one of the runs' reports has each host ok; the other stopped it at the lock."""
    for host in hosts:
        ok = [name for name, r in reports.items() if (r["hosts"].get(host) or {}).get("ok")
              and host not in r["failed"]]
        stopped = [name for name, r in reports.items()
                   if r["failed"].get(host, {}).get("stage") == LOCK_OP]
        assert len(ok) == 1 and len(stopped) == len(reports) - 1, (host, reports)


@pytest.fixture(scope="module")
def conc(lab):
    subprocess.run(["rm", "-rf", str(CACHE)], check=True)
    yield
    for host in ("h25", "h26"):
        labmod.renew(host)  # what the next module finds: fresh hosts, not half-done ones


# --- two deploys at once -------------------------------------------------------------------

@pytest.mark.parametrize("round_", range(REPEAT))
def test_two_deploys_started_together_one_works_on_each_host(lab, conc, round_):
    renew("h25", "h26")
    hosts = {"h25", "h26"}
    a, b = inventory("together-a", sorted(hosts)), inventory("together-b", sorted(hosts))
    procs = [start(lab, a), start(lab, b)]
    try:
        rcs = [p.wait(timeout=1200) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                kill(p)
    out = {"a": log(a), "b": log(b)}
    ids = {k: run_id(v) for k, v in out.items()}
    reports = {"a": fleet("together-a"), "b": fleet("together-b")}
    worked_once(reports, hosts)
    for me, other in (("a", "b"), ("b", "a")):
        mine = {h for h in hosts if reports[me]["failed"].get(h, {}).get("stage") == LOCK_OP}
        if mine:
            stopped_by(out[me], ids[other], mine)
            assert rcs[0 if me == "a" else 1] != 0
    released(lab, "h25", "h26")
    unchanged(lab, inventory("together-rerun", sorted(hosts)))


@pytest.mark.parametrize("round_", range(REPEAT))
def test_a_deploy_started_15_s_after_another_stops_on_its_host_and_the_others_go_on(
        lab, conc, round_):
    renew("h25", "h26")
    a, b = inventory("later-a", ["h25"]), inventory("later-b", ["h25", "h26"])
    first = start(lab, a)
    try:
        time.sleep(15)
        assert first.poll() is None, log(a)[-3000:]
        second = lab.deploy(inventory=b)
        # b stopped h25 at its first operation, and deployed h26 whole meanwhile.
        assert second.returncode != 0, second.stdout[-4000:]
        assert first.wait(timeout=1200) == 0, log(a)[-5000:]
    finally:
        if first.poll() is None:
            kill(first)
    stopped_by(second.stdout, run_id(log(a)), {"h25"})
    report = fleet("later-b")
    assert report["failed"]["h25"]["stage"] == LOCK_OP and "another deploy" in \
        report["failed"]["h25"]["error"]
    assert report["hosts"]["h26"]["ok"] and "h26" not in report["failed"]
    assert fleet("later-a")["hosts"]["h25"]["ok"]
    # h25 stopped at once: the line came before any other operation's on it.
    text = ANSI.sub("", second.stdout)
    assert text.index("another deploy is running here") < text.index("--> Starting operation: GPU")
    released(lab, "h25", "h26")
    unchanged(lab, inventory("later-rerun", ["h25", "h26"]))


# On a host, a git that takes 6 s more for each clone: the lab's remotes answer in
# milliseconds, a real clone of the model repo takes a while.
SLOW_GIT = "#!/bin/sh\ncase \"$1\" in clone) sleep 6;; esac\nexec /usr/bin/git \"$@\"\n"


def slow_git(lab, host: str, on: bool = True):
    lab.ssh(host, f"printf %s {shlex_quote(SLOW_GIT)} > /usr/local/bin/git && chmod 755 /usr/local/bin/git"
            if on else "rm -f /usr/local/bin/git")


def cloning(lab, host: str) -> bool:
    return lab.ssh(host, "pgrep -f '[g]it clone' >/dev/null", check=False).returncode == 0


@pytest.mark.parametrize("round_", range(REPEAT))
def test_a_deploy_meeting_another_at_the_clone_stage_stops_and_the_clone_is_whole(
        lab, conc, round_):
    renew("h25", "h26")
    hosts = ["h25", "h26"]
    slow_git(lab, "h25")
    a, b = inventory("clone-a", hosts), inventory("clone-b", hosts)
    first = start(lab, a)
    try:
        wait_for(lambda: cloning(lab, "h25"), "a clone on h25", timeout=900, proc=first)
        second = lab.deploy(inventory=b)
        assert first.wait(timeout=1200) == 0, log(a)[-5000:]
    finally:
        if first.poll() is None:
            kill(first)
        slow_git(lab, "h25", on=False)
    assert second.returncode != 0
    stopped_by(second.stdout, run_id(log(a)), set(hosts))
    worked_once({"a": fleet("clone-a"), "b": fleet("clone-b")}, set(hosts))
    for host in hosts:
        # One checkout in place, no clone directory left beside it.
        left = lab.ssh(host, "ls -d /opt/chatglm/ChatGLM-6B.* /opt/chatglm/models/*.* 2>/dev/null; true")
        assert left.stdout.strip() == "", left.stdout
    released(lab, *hosts)
    unchanged(lab, inventory("clone-rerun", hosts))


# --- Ctrl-C ------------------------------------------------------------------------------

def interrupt(proc: subprocess.Popen, sig=signal.SIGINT) -> int:
    """Ctrl-C as a terminal sends it: to the deploy's whole process group."""
    os.killpg(proc.pid, sig)
    try:
        return proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        kill(proc)
        raise AssertionError("the deploy did not stop within 60 s of the signal")


def running(lab, inv: Path, host: str, op: str, process: str) -> bool:
    """This run has started op on host, and process runs there (not one an earlier,
    interrupted run left running: the log must show the operation first)."""
    return (f"--> Starting operation: {op}" in log(inv)
            and lab.ssh(host, f"pgrep -f {shlex_quote(process)} >/dev/null", check=False).returncode == 0)


def idle(lab, host: str, process: str) -> bool:
    return lab.ssh(host, f"pgrep -f {shlex_quote(process)} >/dev/null", check=False).returncode != 0


def interrupted_at(name: str, host: str, stage: str, rc: int, inv: Path):
    assert rc == 130, log(inv)[-4000:]
    report = fleet(name)
    failed = report["failed"][host]
    assert failed["stage"] == stage and failed["interrupted"], failed
    # No figures but this run's: the stale result file planted before is not shown.
    assert report["hosts"][host] == {}, report["hosts"][host]
    text = (report_dir(name) / "fleet.md").read_text()
    assert re.search(rf"^\| {host} \|.*\| INTERRUPTED \({re.escape(stage[:60])}", text, re.M), text
    assert "Interrupted by SIGINT" in log(inv)


def test_ctrl_c_in_the_python_stage_the_clone_and_the_smoke_test(lab, conc):
    """One fresh host, interrupted three times on its way: in pip, in git clone (slowed on
    the host by a git wrapper), in the smoke test; each time the exit status is 130, the
    report marks it INTERRUPTED at that operation with no figures, and the lock is free;
    the rerun after the last converges and the one after it changes nothing."""
    renew("h25")
    name = "sigint"
    inv = inventory(name, ["h25"])
    stale = {"variant": "int4", "ok": True, "host": "another-h25", "load_s": 99.0, "answers": []}

    def plant():
        (report_dir(name) / "hosts").mkdir(parents=True, exist_ok=True)
        (report_dir(name) / "hosts" / "h25.json").write_text(json.dumps(stale))

    plant()
    proc = start(lab, inv)
    wait_for(lambda: running(lab, inv, "h25", "Python | torch for", "pip [i]nstall"), "pip on h25",
             timeout=900, proc=proc)
    time.sleep(2)
    rc = interrupt(proc)
    interrupted_at(name, "h25", "Python: torch for the resolved CUDA and the pinned requirements",
                   rc, inv)
    released(lab, "h25")

    slow_git(lab, "h25")
    plant()
    proc = start(lab, inv)
    wait_for(lambda: running(lab, inv, "h25", "Model | clone", "[g]it clone"), "git clone on h25",
             timeout=900, proc=proc)
    rc = interrupt(proc)
    interrupted_at(name, "h25", "Model: clone ChatGLM-6B code", rc, inv)
    released(lab, "h25")
    slow_git(lab, "h25", on=False)

    plant()
    proc = start(lab, inv)
    wait_for(lambda: running(lab, inv, "h25", "Smoke | chat test", "[s]moke_test.py"),
             "the smoke test on h25", timeout=900, proc=proc)
    rc = interrupt(proc)
    interrupted_at(name, "h25", "Smoke: chat test", rc, inv)
    released(lab, "h25")

    rerun = lab.deploy(inventory=inv)
    assert rerun.returncode == 0, rerun.stdout[-5000:]
    result = fleet(name)["hosts"]["h25"]
    assert result["ok"] and result.get("host") == "h25" and not fleet(name)["failed"]
    unchanged(lab, inv)
    left = lab.ssh("h25", "ls -d /opt/chatglm/ChatGLM-6B.* 2>/dev/null; true").stdout.split()
    # Only what the interrupted clone's own git could still write after the deploy was gone.
    assert all(".partial-" in p for p in left), left


def test_sigterm_exits_non_zero_with_the_report(lab, conc):
    """SIGTERM (a CI job cancelled): 143, and the unfinished host is INTERRUPTED."""
    inv = inventory("sigterm", ["h25"])
    # The smoke test an interrupted run started goes on on the host: wait for its end.
    wait_for(lambda: idle(lab, "h25", "[s]moke_test.py"), "no smoke test on h25", timeout=300)
    lab.ssh("h25", "rm -f /opt/chatglm/smoke/result.json")
    proc = start(lab, inv)
    wait_for(lambda: running(lab, inv, "h25", "Smoke | chat test", "[s]moke_test.py"),
             "the smoke test on h25", timeout=600, proc=proc)
    assert interrupt(proc, signal.SIGTERM) == 143
    failed = fleet("sigterm")["failed"]["h25"]
    assert failed["stage"] == "Smoke: chat test" and failed["interrupted"]
    assert "SIGTERM" in failed["error"]


# --- paths --------------------------------------------------------------------------------

def test_install_dir_and_weights_cache_with_a_space_through_a_whole_deploy(lab, conc):
    renew("h26")
    where = "/opt/chat glm/it's $HOME*"
    cache = LAB / "cache with space" / "x y"
    subprocess.run(["rm", "-rf", str(cache.parent)], check=True)
    inv = inventory("space", ["h26"], install_dir=where, weights_cache=str(cache))
    first = lab.deploy(inventory=inv)
    assert first.returncode == 0, first.stdout[-6000:]
    result = fleet("space")["hosts"]["h26"]
    assert result["ok"] and result["model_dir"] == f"{where}/models/chatglm-6b-int4", result
    # Exactly that directory, nothing at a split or expanded name.
    listing = lab.ssh("h26", "ls -A /opt").stdout.split("\n")
    assert "chat glm" in listing and "chat" not in listing and "chatglm" not in listing, listing
    lab.ssh("h26", f"test -x {shlex_quote(where)}/venv/bin/python")
    assert any(cache.glob("blobs/*"))
    unchanged(lab, inv)




# --- host key ------------------------------------------------------------------------------

def test_a_changed_host_key_is_reported_with_the_fix_for_the_inventory_file(lab, conc):
    """h26 comes back with a new host key; h25 (deployed above) goes on."""
    record = next(h for h in labmod.load_state()["hosts"] if h["name"] == "h26")
    key = Path(record["root"]) / "etc/ssh/ssh_host_ed25519_key"
    saved = {p: p.read_bytes() for p in (key, key.with_suffix(".pub"))}
    known = LAB / "ssh" / "known_hosts"
    try:
        for p in saved:
            p.unlink()
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
        labmod.power_cycle("h26")
        run = lab.deploy(inventory=inventory("hostkey", ["h25", "h26"]))
    finally:
        for p, data in saved.items():
            p.write_bytes(data)
        labmod.power_cycle("h26")
    assert run.returncode != 0
    port = record["port"]
    failed = fleet("hostkey")["failed"]["h26"]
    assert failed["stage"] == "connect"
    assert failed["error"].startswith(f"the host key of [127.0.0.1]:{port} changed: it offers "
                                      "ssh-ed25519 SHA256:"), failed
    fix = f"ssh-keygen -R '[127.0.0.1]:{port}' -f {known}"
    assert fix in failed["error"] and f"{known} (the inventory's ssh_known_hosts_file)" in \
        failed["error"]
    assert fix in ANSI.sub("", run.stdout)
    assert fleet("hostkey")["hosts"]["h25"]["ok"]  # the other host went on
    # The fix works as printed, on a copy of the file: the old key goes, the others stay.
    copy = LAB / "known_hosts-copy"
    copy.write_bytes(known.read_bytes())
    subprocess.run(["sh", "-c", fix.replace(str(known), str(copy))], check=True,
                   capture_output=True)
    assert f"[127.0.0.1]:{port} " not in copy.read_text()
    assert len(copy.read_text().splitlines()) == len(known.read_text().splitlines()) - 1
