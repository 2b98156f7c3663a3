"""The shell of the facts a converged host reads at every run, run by a real sh against
real files and git repos (the lab tests run them on the lab's hosts too).

These commands avoid starting processes (the shell reads files itself, the LFS pointers
come from an index when there is one), so each is checked against what git, nproc and
the other tools they replace say.
"""

import hashlib
import os
import shutil
import subprocess

import pytest

from facts import gpu, kernel, model, smoke, system
from operations import model as model_ops
from operations.settings import VERIFIED


def sh(command: str, **kwargs):
    proc = subprocess.run(["sh", "-c", command], capture_output=True, text=True, **kwargs)
    return proc.stdout.splitlines()


def read(cls, env=None, **kwargs):
    """The fact's value as pyinfra makes it: its default when the command prints nothing."""
    fact = cls()
    lines = sh(fact.command(**kwargs), env=env)
    return fact.process(lines) if lines else fact.default()


def git(cwd, *args, **kwargs):
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True,
                          **kwargs).stdout.strip()


@pytest.fixture
def lfs_repo(tmp_path):
    """A checkout of a commit with two LFS pointers (one with a space in its name) and a
    plain file, detached at that commit as model.clone leaves it."""
    repo = tmp_path / "repo"
    repo.mkdir()
    git(repo, "init", "-q")
    (repo / ".gitattributes").write_text("*.bin filter=lfs diff=lfs merge=lfs -text\n")
    for name, data in (("a.bin", b"A" * 10), ("b c.bin", b"B" * 20)):
        oid = hashlib.sha256(data).hexdigest()
        (repo / name).write_text(f"version https://git-lfs.github.com/spec/v1\noid sha256:{oid}\n"
                                 f"size {len(data)}\n")
    (repo / "config.json").write_text("{}")
    git(repo, "add", "-A")
    git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "m")
    head = git(repo, "rev-parse", "HEAD")
    git(repo, "checkout", "-q", "--detach", head)
    return repo, head


def test_git_head_detached_branch_and_none(lfs_repo, tmp_path):
    repo, head = lfs_repo
    assert read(model.GitHead, path=str(repo)) == head  # detached: read by the shell
    git(repo, "checkout", "-q", "-B", "main")
    assert (repo / ".git" / "HEAD").read_text().startswith("ref:")
    assert read(model.GitHead, path=str(repo)) == head  # a branch: asked of git
    assert read(model.GitHead, path=str(tmp_path / "none")) == ""


def test_lfs_files_from_git_and_from_the_index_agree(lfs_repo):
    repo, head = lfs_repo
    D = VERIFIED
    (repo / "a.bin").write_bytes(b"A" * 10)  # downloaded and verified
    (repo / D).mkdir()
    (repo / D / "a.bin").write_text(hashlib.sha256(b"A" * 10).hexdigest() + "\n")
    from_git = read(model.LfsFiles, path=str(repo))
    assert sorted(from_git) == ["a.bin", "b c.bin"]
    assert from_git["a.bin"]["actual"] == 10 and from_git["a.bin"]["verified"] == from_git["a.bin"]["oid"]
    assert from_git["b c.bin"]["size"] == 20 and from_git["b c.bin"]["verified"] == "-"
    assert read(model.PointerIndex, path=str(repo)) == {"head": head, "indexed": False}

    # What the weights operation writes, run by sh.
    command = model_ops._index_pointers(str(repo), head, from_git)
    subprocess.run(command.get_raw_value(), shell=True, check=True)
    assert read(model.PointerIndex, path=str(repo)) == {"head": head, "indexed": True}
    # The index is read by the shell: with no git on PATH the answer is the same.
    bin_dir = repo.parent / "bin"
    bin_dir.mkdir()
    for tool in ("sh", "stat"):
        (bin_dir / tool).symlink_to(shutil.which(tool))
    env = {"PATH": str(bin_dir)}
    assert sh("command -v git || echo none", env=env) == ["none"]
    assert read(model.LfsFiles, env=env, path=str(repo)) == from_git
    (repo / "b c.bin").unlink()  # a file gone from the work tree
    assert read(model.LfsFiles, path=str(repo))["b c.bin"]["actual"] == -1


def test_lfs_files_of_no_checkout(tmp_path):
    assert read(model.LfsFiles, path=str(tmp_path / "none")) == {}
    assert read(model.PointerIndex, path=str(tmp_path / "none")) == {"head": "", "indexed": False}


def test_host_resources_match_nproc_and_meminfo():
    with open("/proc/meminfo") as f:
        total = next(int(line.split()[1]) for line in f if line.startswith("MemTotal:"))
    cpus = int(subprocess.check_output(["nproc"], text=True))
    assert read(system.HostResources) == {"cpus": cpus, "ram_bytes": total * 1024}
    assert read(system.CpuCount) == cpus and read(system.MemoryBytes) == total * 1024


def test_os_release_gives_the_os_id(tmp_path):
    fields = read(system.OsRelease)
    want = {}
    with open("/etc/os-release") as f:
        for line in f:
            key, _, value = line.strip().partition("=")
            want[key] = value.strip('"')
    assert fields["ID"] == want["ID"] and fields.get("VERSION_ID") == want.get("VERSION_ID")
    parsed = system.OsRelease().process(['NAME="Ubuntu"', "VERSION_ID='22.04'", "# note",
                                         'PRETTY_NAME="Ubuntu 22.04.4 LTS"', "ID=ubuntu", ""])
    assert parsed == {"NAME": "Ubuntu", "VERSION_ID": "22.04",
                      "PRETTY_NAME": "Ubuntu 22.04.4 LTS", "ID": "ubuntu"}


def test_kernel_state_hashes_the_source_and_reads_the_stamp(tmp_path):
    source, built = tmp_path / "k.c", tmp_path / "k.so"
    assert read(kernel.KernelState, source=str(source), built=str(built)) == {"source": "", "built": ""}
    source.write_text("int f(void) { return 1; }\n")
    digest = hashlib.sha256(source.read_bytes()).hexdigest()
    assert read(kernel.KernelState, source=str(source), built=str(built)) == {"source": digest, "built": ""}
    built.write_text("so")
    (tmp_path / ("k.so." + kernel.STAMP.lstrip("."))).write_text(digest + "\n")
    assert read(kernel.KernelState, source=str(source), built=str(built)) == {"source": digest, "built": digest}


def test_pci_scan_and_driver_libraries_match_what_python_and_ldconfig_see():
    """The PCI scan read by the shell against a scan of sysfs in Python; the driver
    libraries (gated by a grep of ld.so.cache) against ldconfig's own listing."""
    from pathlib import Path

    want = []
    for device in sorted(Path("/sys/bus/pci/devices").glob("*")):
        try:
            if (device / "vendor").read_text().strip() != gpu.NVIDIA_VENDOR:
                continue
            if (device / "class").read_text().startswith("0x03"):
                want.append({"pci": device.name, "device": (device / "device").read_text().strip()})
        except OSError:
            continue
    assert read(gpu.NvidiaPciDevices) == want
    listed = sh("ldconfig -p 2>/dev/null | sed -n 's/.*libcuda\\.so\\.1 .*=> //p'")
    found = [f"{d}/libcuda.so.1" for d in gpu.LIB_DIRS if os.path.exists(f"{d}/libcuda.so.1")]
    assert {lib["link"] for lib in read(gpu.DriverLibraries)} == set(listed + found)


def test_inline_facts_in_one_batch_give_what_each_gives_alone(lfs_repo, tmp_path):
    """Facts marked batch_inline run in the batch's own shell, one after another: none may
    leave a variable, a directory or an exit behind that changes another's answer. Every
    inline fact, in two orders, against files where they take their different branches."""
    from operations import factcache
    from tests.test_factcache import live, run_batch

    repo, head = lfs_repo
    subprocess.run(model_ops._index_pointers(str(repo), head, read(model.LfsFiles, path=str(repo)))
                   .get_raw_value(), shell=True, check=True)
    branch = tmp_path / "branch"
    subprocess.run(["git", "clone", "-q", str(repo), str(branch)], check=True,
                   env={**os.environ, "GIT_LFS_SKIP_SMUDGE": "1"})
    source = tmp_path / "k.c"
    source.write_text("int f(void) { return 1; }\n")
    quant = tmp_path / "quantization.py"
    quant.write_text("def quantize():\n    load_cpu_kernel(**kwargs)\n")
    facts = [
        (system.OsRelease, {}), (system.HostResources, {}), (system.CpuCount, {}),
        # A path under /proc (walked up to it): a disk's free space moves between the two
        # reads whenever anything else on the machine writes.
        (system.MemoryBytes, {}), (system.FreeDiskBytes, {"path": "/proc/no such/dir"}),
        (system.MissingDebs, {"packages": ["dpkg", "no-such-package"]}),
        (gpu.NvidiaPciDevices, {}), (gpu.NvidiaSmi, {}), (gpu.KernelModule, {}),
        (gpu.DriverLibraries, {}), (gpu.CudaToolkits, {}), (gpu.AptHolds, {}),
        (model.GitHead, {"path": str(repo)}), (model.GitHead, {"path": str(branch)}),
        (model.GitHead, {"path": str(tmp_path / "none")}),
        (model.LfsFiles, {"path": str(repo)}), (model.LfsFiles, {"path": str(branch)}),
        (model.LfsFiles, {"path": str(tmp_path / "none")}),
        (model.PointerIndex, {"path": str(repo)}), (model.PointerIndex, {"path": str(branch)}),
        (kernel.KernelState, {"source": str(source), "built": str(tmp_path / "k.so")}),
        (kernel.KernelState, {"source": str(tmp_path / "none.c"), "built": str(tmp_path / "k.so")}),
        (kernel.PatchLines, {"path": str(quant)}),
        (kernel.PatchLines, {"path": str(tmp_path / "none.py")}),
        (smoke.SmokeState, {"path": str(repo), "smoke_dir": str(tmp_path / "smoke")}),
    ]
    assert all(factcache._fact_command(cls, kwargs)[1] for cls, kwargs in facts)
    for order in (facts, facts[::-1]):
        got = run_batch(order)
        assert len(got) == len(order)
        for i, (cls, kwargs) in enumerate(order):
            assert got[i] == live(cls, kwargs), (cls, kwargs)


def test_missing_debs_from_the_status_file_match_dpkg_query():
    """The awk over dpkg's status file and dpkg-query (what it replaced) agree on this
    machine's packages, the installed, the absent and any only partly there."""
    with open("/var/lib/dpkg/status") as f:
        stanzas = f.read().split("\n\n")
    names = [s.split("\n", 1)[0].removeprefix("Package: ") for s in stanzas if s.startswith("Package: ")]
    not_ok = [n for n, s in zip(names, stanzas) if "Status: install ok installed" not in s]
    packages = ["dpkg", "bash", "no-such-package", "coreutils", *not_ok[:5], *names[:40]]
    direct = subprocess.run(["dpkg-query", "-W", "-f=${db:Status-Abbrev} ${Package}\n", *packages],
                            capture_output=True, text=True).stdout.splitlines()
    want = system.MissingDebs().process([f"want {' '.join(packages)}", *direct])
    assert read(system.MissingDebs, packages=packages) == want
    assert "no-such-package" in want and "dpkg" not in want
