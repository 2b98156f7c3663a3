"""What every stage reads of the host itself: OS release, CPUs, memory, free disk, missing
Debian packages.
"""

import shlex

from pyinfra.api import FactBase


# Read by the shell itself (every process a converged host's facts start adds to every
# run). The CPUs this shell may run on, as nproc counts them, from Cpus_allowed_list
# ("0-3,8-11"); nproc only when that is missing.
CPU_COUNT = ("cpus=0; while read -r key list; do [ \"$key\" = Cpus_allowed_list: ] || continue; "
             "rest=$list,; while [ -n \"$rest\" ]; do r=${rest%%,*}; rest=${rest#*,}; "
             "case $r in *-*) cpus=$((cpus + ${r#*-} - ${r%-*} + 1));; ?*) cpus=$((cpus + 1));; esac; "
             "done; break; done < /proc/self/status; [ $cpus -gt 0 ] || cpus=$(nproc); echo $cpus")


MEM_TOTAL = ("while read -r key value unit; do "
             "[ \"$key\" = MemTotal: ] && echo $((value * 1024)) && break; done < /proc/meminfo")


class CpuCount(FactBase):
    """Number of online CPUs."""

    batch_inline = True  # see operations.factcache._fact_command

    def command(self):
        return CPU_COUNT

    @staticmethod
    def default():
        return 1

    def process(self, output):
        return int(output[0])


class MemoryBytes(FactBase):
    """Total RAM of the host in bytes (MemTotal)."""

    batch_inline = True  # see operations.factcache._fact_command

    def command(self):
        return MEM_TOTAL

    @staticmethod
    def default():
        return 0

    def process(self, output):
        return int(float(output[0]))


class HostResources(FactBase):
    """{"cpus": online CPUs, "ram_bytes": MemTotal}: CpuCount and MemoryBytes in one command,
    read once at collection for the stages that need them."""

    batch_inline = True  # see operations.factcache._fact_command

    def command(self):
        return f"{CPU_COUNT}; {MEM_TOTAL}"

    @staticmethod
    def default():
        return {"cpus": 1, "ram_bytes": 0}

    def process(self, output):
        return {"cpus": int(output[0]), "ram_bytes": int(float(output[1]))}


class FreeDiskBytes(FactBase):
    """Bytes available to root on the filesystem holding the deepest existing parent of path."""

    batch_inline = True  # see operations.factcache._fact_command

    def command(self, path):
        return (f"p={shlex.quote(path)}; while [ ! -e \"$p\" ]; do p=$(dirname \"$p\"); done; "
                "df -B1 --output=avail \"$p\"")  # process() takes the last line

    @staticmethod
    def default():
        return 0

    def process(self, output):
        return int(output[-1].strip())


class OsRelease(FactBase):
    """The host's os-release fields ({"ID": "debian", "VERSION_ID": "12", ...}); {} when it
    has none. Read by the shell itself (pyinfra's LinuxDistribution starts ~8 processes)."""

    batch_inline = True  # see operations.factcache._fact_command

    def command(self):
        return ("for f in /etc/os-release /usr/lib/os-release; do [ -r $f ] || continue; "
                "while IFS= read -r line || [ -n \"$line\" ]; do printf '%s\\n' \"$line\"; "
                "done < $f; break; done")

    @staticmethod
    def default():
        return {}

    def process(self, output):
        fields = {}
        for line in output:
            key, sep, value = line.strip().partition("=")
            if not sep or key.startswith("#"):
                continue
            try:
                fields[key] = " ".join(shlex.split(value))  # os-release quotes as the shell does
            except ValueError:
                fields[key] = value.strip("\"'")
        return fields


class MissingDebs(FactBase):
    """Which of the given Debian packages dpkg does not have installed (one dpkg-query,
    where apt.packages reads the whole `dpkg -l`)."""

    batch_inline = True  # see operations.factcache._fact_command

    def command(self, packages):
        names = " ".join(shlex.quote(p) for p in packages)
        # dpkg's status file read by one awk (half the time of dpkg-query, which parses
        # more of its database); dpkg-query when dpkg left journal entries not yet merged.
        # Both print "<want><status> <package>" per instance, e.g. "ii git".
        script = ("BEGIN { n = split(want, w, \" \"); for (i = 1; i <= n; i++) W[w[i]] = 1 } "
                  "/^Package: / { p = $2 } "
                  "/^Status: / && (p in W) { print substr($2, 1, 1) ($4 == \"installed\" ? \"i\" : \"-\"), p }")
        return (f"echo want {names}; pending=; "
                "for u in /var/lib/dpkg/updates/*; do [ -e \"$u\" ] && pending=1; break; done; "
                "if [ -z \"$pending\" ] && [ -r /var/lib/dpkg/status ]; then "
                f"awk -v want={shlex.quote(' '.join(packages))} {shlex.quote(script)} /var/lib/dpkg/status; "
                f"else dpkg-query -W -f='${{db:Status-Abbrev}} ${{Package}}\\n' {names} 2>/dev/null; fi; true")

    @staticmethod
    def default():
        return []

    def process(self, output):
        want = output[0].split()[1:]
        installed = {line.split()[1] for line in output[1:]
                     if len(line.split()) == 2 and line.startswith("ii")}
        return [p for p in want if p not in installed]
