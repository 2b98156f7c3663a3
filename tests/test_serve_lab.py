"""The serve stage on lab hosts that boot systemd as PID 1 (conftest.SYSTEMD_HOSTS): h30 takes
the whole deploy (int4 fixture on CPU) and serves; h31 stays fresh for what must stop a run, or
fail a host, before anything changes.

The API is asked from this machine through a loopback forward into h30's network namespace
(what a client on the host itself would see), with the openai client for the chat endpoint.
"""

import json
import os
import runpy
import socket
import stat
import subprocess
import time
from pathlib import Path

import pytest
import requests

from tests.test_deploy_lab import totals

ROOT = Path(__file__).resolve().parent.parent
UNIT = "chatglm-server.service"


def report_dir() -> Path:
    from lab.lab import LAB

    return LAB / "reports-serve"


def inventory(lab, name: str, hosts: dict) -> Path:
    """The lab's inventory entries of these hosts with their data changed: {host: {setting: value}}."""
    entries = dict(runpy.run_path(str(lab.inventory))["lab"])
    lines = ["lab = ["]
    for host, data in hosts.items():
        merged = {**entries[host], "report_dir": str(report_dir()), **data}
        lines.append(f"    ({host!r}, {merged!r}),")
    path = lab.inventory.with_name(f"inventory-serve-{name}.py")
    path.write_text("\n".join(lines + ["]", ""]))
    return path


def show(lab, host: str, *props: str) -> dict:
    out = lab.ssh(host, f"systemctl show {UNIT} " + " ".join(f"-p {p}" for p in props)).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def served(lab):
    """h30 deployed once, then a loopback forward from here to its port 8000."""
    inv = inventory(lab, "base", {"h30": {}})
    first = lab.deploy(inventory=inv)
    assert first.returncode == 0, first.stdout[-8000:]
    port = free_port()
    netns = lab.hosts["h30"]["netns"]
    forward = subprocess.Popen(
        ["socat", f"TCP-LISTEN:{port},bind=127.0.0.1,reuseaddr,fork",
         f"EXEC:ip netns exec {netns} socat STDIO TCP\\:127.0.0.1\\:8000"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 10
        while time.time() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.1)
        yield {"inventory": inv, "first": first, "url": f"http://127.0.0.1:{port}"}
    finally:
        forward.kill()
        forward.wait()


def key(lab) -> str:
    return lab.ssh("h30", "cat /etc/chatglm/api.key").stdout.strip()


def wait_ready(url: str, timeout: float = 180) -> dict:
    deadline = time.time() + timeout
    last = None
    while time.time() < deadline:
        try:
            last = requests.get(f"{url}/health", timeout=5)
            if last.status_code == 200:
                return last.json()
        except requests.RequestException as exc:
            last = exc
        time.sleep(0.5)
    raise AssertionError(f"/health not ready within {timeout}s: {last}")


def test_deploy_runs_a_hardened_enabled_service_and_a_rerun_changes_nothing(lab, served):
    out = served["first"].stdout
    # The unit is active, enabled at boot, run by the service user with its sandbox.
    assert lab.ssh("h30", f"systemctl is-active {UNIT}; systemctl is-enabled {UNIT}").stdout.split() == \
        ["active", "enabled"]
    props = show(lab, "h30", "User", "NoNewPrivileges", "ProtectSystem", "ProtectHome", "PrivateTmp",
                 "ReadWritePaths", "ReadOnlyPaths", "Restart", "KillSignal", "TimeoutStopUSec", "MainPID")
    assert props["User"] == "chatglm" and props["NoNewPrivileges"] == "yes"
    assert props["ProtectSystem"] == "strict" and props["ProtectHome"] == "yes" and props["PrivateTmp"] == "yes"
    assert "/var/lib/chatglm" in props["ReadWritePaths"] and "/opt/chatglm" in props["ReadOnlyPaths"]
    assert props["Restart"] == "on-failure" and props["KillSignal"] == "15"
    assert props["TimeoutStopUSec"] == "45s"
    who = lab.ssh("h30", f"ps -o user= -p {props['MainPID']}; id -u chatglm; "
                         "getent passwd chatglm | cut -d: -f7").stdout.split()
    assert who[0] == "chatglm" and int(who[1]) < 1000 and who[2] == "/usr/sbin/nologin"
    # The sandbox holds, seen from the service's own mount namespace: its code, config and model
    # are read-only there (they are root's anyway: this is ProtectSystem/ReadOnlyPaths at work,
    # since root cannot write them either), its state directory is writable, /tmp is its own.
    pid = props["MainPID"]
    for path in ("/opt/chatglm/models/probe", "/opt/chatglm/runtime/probe", "/etc/chatglm/probe", "/root/probe"):
        denied = lab.ssh("h30", f"nsenter -t {pid} -m touch {path}", check=False)
        assert denied.returncode != 0 and any(
            why in denied.stderr for why in ("Read-only file system", "Permission denied")), (path, denied.stderr)
    lab.ssh("h30", f"nsenter -t {pid} -m sh -c 'touch /var/lib/chatglm/probe && rm /var/lib/chatglm/probe'")
    lab.ssh("h30", f"touch /tmp/host-probe; nsenter -t {pid} -m sh -c '! test -e /tmp/host-probe'; rm /tmp/host-probe")

    # The server's packages came from the host lock, and the env is consistent.
    assert "No broken requirements" in lab.ssh("h30", "/opt/chatglm/venv/bin/python -m pip check").stdout

    # The key: on the host the service user's, 0600; here the same bytes, 0600; never printed.
    secret = key(lab)
    assert len(secret) == 64 and lab.ssh("h30", "stat -c '%U %a' /etc/chatglm/api.key").stdout.strip() == "chatglm 600"
    local = report_dir() / "keys" / "h30.key"
    assert local.read_text().strip() == secret and stat.S_IMODE(local.stat().st_mode) == 0o600
    assert stat.S_IMODE(local.parent.stat().st_mode) == 0o700
    assert secret not in out

    # The API answers with the key, 401 without; the chat endpoint streams to the openai client.
    url = served["url"]
    health = wait_ready(url)
    assert health["status"] == "ready" and health["variant"] == "int4" and health["device"] == "cpu"
    assert requests.get(f"{url}/v1/models", timeout=10).status_code == 401
    assert requests.get(f"{url}/v1/models", headers={"Authorization": "Bearer wrong"}, timeout=10).status_code == 401
    assert requests.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {secret}"}, timeout=10).status_code == 200
    from openai import OpenAI

    client = OpenAI(base_url=f"{url}/v1", api_key=secret, max_retries=0, timeout=120)
    chunks = list(client.chat.completions.create(
        model="chatglm-6b", messages=[{"role": "user", "content": "你好"}], max_tokens=8, stream=True))
    assert chunks and "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    # Upstream api.py's format on POST /, for the clients written against it.
    legacy = requests.post(f"{url}/", json={"prompt": "你好", "history": [], "max_length": 64},
                           headers={"Authorization": f"Bearer {secret}"}, timeout=120)
    assert legacy.status_code == 200 and legacy.json()["status"] == 200 and legacy.json()["response"].strip()
    assert requests.post(f"{url}/", json={"prompt": "你好"}, timeout=10).status_code == 401

    # The fleet report lists the endpoint, the health and the time from unit start to ready.
    result = json.loads((report_dir() / "serve" / "h30.json").read_text())
    assert result["endpoint"] == "http://127.0.0.1:8000" and result["health"]["status"] == "ready"
    assert 0 < result["ready_s"] < 600
    # The smoke conversation went through the service: five streamed answers, one conversation.
    answers = result["answers"]
    assert len(answers) == 5 and all(a["response"].strip() and a["tokens"] > 0 for a in answers), answers
    assert all(0 < a["ttft_s"] <= a["seconds"] and a["tokens_per_s"] > 0 for a in answers)
    fleet = (report_dir() / "fleet.md").read_text()
    assert "## Serving" in fleet and "| h30 | http://127.0.0.1:8000 | ready |" in fleet
    # That conversation is the smoke test of a served host: no in-process test ran beside it,
    # and the report's row has its figures (memory and versions from the server's /health).
    assert "Smoke | chat test" not in out and lab.ssh("h30", "test ! -e /opt/chatglm/smoke", check=False).returncode == 0
    row = next(line for line in fleet.splitlines() if line.startswith("| h30 | int4 | cpu |"))
    assert row.endswith("| ok (through the service) |") and "| - | - |" not in row, row
    assert result["health"]["peak_rss_gb"] > 0 and result["health"]["versions"]["torch"]

    again = lab.deploy(inventory=served["inventory"])
    assert again.returncode == 0, again.stdout[-4000:]
    t = totals(again.stdout)
    assert t["success"] == 0 and t["no_change"] == t["hosts"], again.stdout[-4000:]
    assert show(lab, "h30", "MainPID")["MainPID"] == props["MainPID"]


def test_kill_9_systemd_restarts_the_server(lab, served):
    before = show(lab, "h30", "MainPID", "NRestarts")
    lab.ssh("h30", f"kill -9 {before['MainPID']}")
    deadline = time.time() + 60
    while time.time() < deadline:
        now = show(lab, "h30", "MainPID", "NRestarts")
        if now["MainPID"] not in ("0", before["MainPID"]):
            break
        time.sleep(0.5)
    assert int(now["NRestarts"]) == int(before["NRestarts"]) + 1, now
    assert wait_ready(served["url"])["status"] == "ready"
    # What runs is what was deployed: the next deploy has nothing to do.
    again = lab.deploy(inventory=served["inventory"])
    assert again.returncode == 0 and totals(again.stdout)["success"] == 0, again.stdout[-4000:]


def test_a_config_change_restarts_once_and_the_next_run_changes_nothing(lab, served):
    before = show(lab, "h30", "InvocationID", "MainPID")
    changed_inv = inventory(lab, "changed", {"h30": {"serve_max_tokens": 256}})
    changed = lab.deploy(inventory=changed_inv)
    assert changed.returncode == 0, changed.stdout[-6000:]
    assert "max_tokens = 256" in lab.ssh("h30", "cat /etc/chatglm/server.toml").stdout
    after = show(lab, "h30", "InvocationID", "MainPID")
    assert after["InvocationID"] != before["InvocationID"] and after["MainPID"] != before["MainPID"]
    assert wait_ready(served["url"])["status"] == "ready"
    again = lab.deploy(inventory=changed_inv)
    assert again.returncode == 0, again.stdout[-4000:]
    t = totals(again.stdout)
    assert t["success"] == 0 and t["no_change"] == t["hosts"], again.stdout[-4000:]
    assert show(lab, "h30", "InvocationID") == {"InvocationID": after["InvocationID"]}


def test_dry_diff_shows_config_and_unit_and_writes_nothing(lab, served):
    watch = "sha1sum /etc/chatglm/server.toml /etc/systemd/system/chatglm-server.service /etc/chatglm/fingerprint"
    before = (lab.ssh("h30", watch).stdout, show(lab, "h30", "InvocationID"))
    local = sorted((p, p.stat().st_mtime_ns) for p in report_dir().rglob("*") if p.is_file())
    inv = inventory(lab, "dry", {"h30": {"serve_max_tokens": 128, "serve_drain_s": 5}})
    dry = lab.deploy("--dry", "--diff", inventory=inv)
    assert dry.returncode == 0, dry.stdout[-4000:]
    assert "Will modify /etc/chatglm/server.toml" in dry.stdout and "max_tokens = 128" in dry.stdout
    assert "Will modify /etc/systemd/system/chatglm-server.service" in dry.stdout
    assert "TimeoutStopSec=20" in dry.stdout
    assert key(lab) not in dry.stdout
    assert (lab.ssh("h30", watch).stdout, show(lab, "h30", "InvocationID")) == before
    assert sorted((p, p.stat().st_mtime_ns) for p in report_dir().rglob("*") if p.is_file()) == local


BAD = [
    ({"serve_port": 70000}, "h31", "serve_port", "outside 1-65535"),
    ({"serve_host": "api.example"}, "h31", "serve_host", "not an IP address"),
    ({"serve_prot": 8001}, "h31", "serve_prot", "did you mean 'serve_port'"),
    ({"stages": "system,python,serve"}, "h31", "stages", "without 'model'"),
]


@pytest.mark.parametrize("data, bad_host, setting, words", BAD)
def test_bad_settings_stop_the_run_before_any_host_is_touched(lab, served, data, bad_host, setting, words):
    watch = "ls -a /opt /etc/chatglm 2>&1; systemctl show chatglm-server.service -p InvocationID"
    before = {h: lab.ssh(h, watch, check=False).stdout for h in ("h30", "h31")}
    inv = inventory(lab, "bad", {"h30": {}, bad_host: data})
    run = lab.deploy(inventory=inv)
    assert run.returncode != 0
    assert f"host '{bad_host}': setting '{setting}'" in run.stdout and words in run.stdout, run.stdout[-3000:]
    assert "Fix:" in run.stdout and "Starting operation" not in run.stdout
    assert {h: lab.ssh(h, watch, check=False).stdout for h in ("h30", "h31")} == before


def test_a_port_in_use_fails_the_host_before_anything_changes(lab):
    lab.ssh("h31", "systemd-run --unit=squatter python3 -m http.server 8000 --bind 127.0.0.1 && "
                   "for i in $(seq 50); do ss -ltnH 'sport = :8000' | grep -q . && break; sleep 0.1; done")
    try:
        before = lab.ssh("h31", "ls -a /opt; dpkg -l | wc -l; getent passwd chatglm", check=False).stdout
        inv = inventory(lab, "port", {"h31": {}})
        run = lab.deploy(inventory=inv)
        assert run.returncode != 0
        assert "port 8000 (setting 'serve_port') is in use by pid" in run.stdout, run.stdout[-3000:]
        assert "python3 -m http.server 8000" in run.stdout and "Fix:" in run.stdout
        assert "Starting operation: System | base packages" not in run.stdout
        assert lab.ssh("h31", "ls -a /opt; dpkg -l | wc -l; getent passwd chatglm", check=False).stdout == before
    finally:
        lab.ssh("h31", "systemctl stop squatter", check=False)


REACH = r"""
import json, socket, sys, urllib.request
ports = json.loads(sys.argv[1])
www = urllib.request.urlopen(f"http://127.0.0.1:{ports['www']}/pypi/simple/", timeout=10)
share = urllib.request.urlopen(f"http://127.0.0.1:{ports['seafile']}/api/v2.1/share-links/"
                               f"{sys.argv[2]}/dirents/?path=/chatglm-6b-int4/", timeout=10)
names = [d.get("file_name") for d in json.load(share)["dirent_list"]]
# git's own protocol: the daemon answers a upload-pack request with the repo's refs.
request = b"git-upload-pack /THUDM/chatglm-6b-int4\0host=127.0.0.1\0"
with socket.create_connection(("127.0.0.1", ports["git"]), timeout=10) as sock:
    sock.sendall(b"%04x" % (len(request) + 4) + request)
    refs = sock.recv(4096)
try:
    socket.create_connection(("127.0.0.1", int(sys.argv[3])), timeout=3).close()
    other = "open"
except OSError:
    other = "closed"
print(json.dumps({"www": www.status, "share": "pytorch_model.bin" in names,
                  "git": b"refs/heads/" in refs or b"HEAD" in refs, "other": other}))
"""


def test_a_systemd_host_reaches_the_stand_ins_and_nothing_else(lab):
    """h31's network namespace has loopback only: the stand-ins answer there through their
    relays, on their usual ports, and nothing else of this machine does (h1's SSH port)."""
    from lab.lab import PORTS, SHARES

    script = lab.ssh("h31", f"cat > /tmp/reach.py <<'PY'\n{REACH}\nPY\n"
                            f"python3 /tmp/reach.py '{json.dumps(PORTS)}' {SHARES['quantized']} "
                            f"{lab.hosts['h1']['port']}")
    assert json.loads(script.stdout) == {"www": 200, "share": True, "git": True, "other": "closed"}
    links = lab.ssh("h31", "ip -o link show | cut -d: -f2; ip -4 -o addr show; ip route show").stdout.split()
    assert links[0] == "lo" and "eth0" not in links and "default" not in links, links
