"""What the serve stage reads: who holds the serving port, and the service's state."""

import shlex

from pyinfra.api import FactBase


UNIT = "chatglm-server.service"
CONFIG_DIR = "/etc/chatglm"
KEY = f"{CONFIG_DIR}/api.key"
FINGERPRINT = f"{CONFIG_DIR}/fingerprint"
UNIT_PATH = f"/etc/systemd/system/{UNIT}"


class PortHolders(FactBase):
    """Who listens on a TCP port: {"listening": bool, "holders": [[pid, command, ours]]}, ours
    when the process runs in the chat server's unit (its cgroup names the unit). Also
    {"systemd": bool}: whether PID 1 is systemd (the stage needs it)."""

    def command(self, port, unit):
        q = shlex.quote
        return (f"[ -d /run/systemd/system ] && echo systemd=yes || echo systemd=no; "
                f"ss -ltnH 'sport = :{int(port)}' 2>/dev/null | grep -q . && echo listening=yes; "
                f"for p in $(ss -ltnpH 'sport = :{int(port)}' 2>/dev/null | grep -o 'pid=[0-9]*' "
                f"| cut -d= -f2 | sort -u); do "
                f"if grep -q {q(unit)} /proc/$p/cgroup 2>/dev/null; then o=ours; else o=other; fi; "
                f"echo \"holder $p $o $(tr '\\0' ' ' < /proc/$p/cmdline | cut -c1-120)\"; done")

    @staticmethod
    def default():
        return {"systemd": False, "listening": False, "holders": []}

    def process(self, output):
        found = {"systemd": False, "listening": False, "holders": []}
        for line in output:
            if line.startswith("systemd="):
                found["systemd"] = line.endswith("yes")
            elif line == "listening=yes":
                found["listening"] = True
            elif line.startswith("holder "):
                _, pid, ours, *cmd = line.split(" ")
                found["holders"].append([int(pid), " ".join(cmd).strip(), ours == "ours"])
        return found


class ServeState(FactBase):
    """The service as the deploy left it, in one command: {"fingerprint": the one written
    after its last ready (re)start, "unit": sha1 of the unit file, "key": "<sha1> <owner>
    <mode>" of the key file, "active": systemctl is-active, "enabled": is-enabled} ('' when absent)."""

    def command(self, unit):
        q = shlex.quote
        return (f"echo \"fingerprint $(cat {FINGERPRINT} 2>/dev/null)\"; "
                f"echo \"unit $(sha1sum {UNIT_PATH} 2>/dev/null | cut -d' ' -f1)\"; "
                f"echo \"key $(sha1sum {KEY} 2>/dev/null | cut -d' ' -f1) $(stat -c '%U %a' {KEY} 2>/dev/null)\"; "
                f"echo \"active $(systemctl is-active {q(unit)} 2>/dev/null)\"; "
                f"echo \"enabled $(systemctl is-enabled {q(unit)} 2>/dev/null)\"")

    @staticmethod
    def default():
        return {"fingerprint": "", "unit": "", "key": "", "active": "", "enabled": ""}

    def process(self, output):
        found = self.default()
        for line in output:
            name, _, value = line.partition(" ")
            if name in found:
                found[name] = value.strip()
        return found
