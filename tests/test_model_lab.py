"""The model stage end to end over SSH on lab hosts h15-h20: clones, weights, kernel, patch.

Each test writes its own inventory (the lab's connection data plus the scenario's
settings), runs the real deploy with stages system,model,kernel, and checks the hosts
by hand and the Seafile stand-in's byte counts (/_lab/stats). The tests share hosts but
not install_dir: each starts from no model at all, and only the OS packages of an
earlier test (no change then) save time.
"""

import ast
import hashlib
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import requests

from lab import lab as labmod
from lab.lab import LAB, PORTS
from lab.remotes import GIT_ENV
from operations.kernel import MARK
from tests import quantization_variants
from tests.test_deploy_lab import totals

SEAFILE = f"http://127.0.0.1:{PORTS['seafile']}"
GIT = f"git://127.0.0.1:{PORTS['git']}"
MIRROR = f"http://127.0.0.1:{PORTS['www']}/models/"
STAGES = "system,model,kernel"
MODELS = {"fp16": "chatglm-6b", "int8": "chatglm-6b-int8", "int4": "chatglm-6b-int4"}
# Every weight file of each model repo, checked against the pointer committed at HEAD.
CHECK_WEIGHTS = (
    "cd {d} && git ls-files -z | xargs -0 git check-attr filter -- | "
    "sed -n 's/: filter: lfs$//p' | while read -r f; do "
    "echo \"$(git show HEAD:\"$f\" | sed -n 's/^oid sha256://p')  $f\"; done | sha256sum -c --strict")


def model_dir(variant, install_dir="/opt/chatglm"):
    return f"{install_dir}/models/{MODELS[variant]}"


def inventory(name: str, hosts: dict, defaults: dict | None = None) -> Path:
    """An inventory of the lab's hosts named in hosts: the lab's connection data, then
    defaults (this file's: the model stages, no smoke test), then the scenario's data."""
    scope = {}
    exec(labmod.LAB.joinpath("inventory.py").read_text(), scope)
    base = dict(scope["lab"])
    if defaults is None:
        defaults = {"stages": STAGES, "smoke_test": False,
                    "report_dir": str(LAB / "reports-model-tests")}
    lines = ["lab = ["]
    for host, data in hosts.items():
        lines.append(f"    ({host!r}, {({**base[host], **defaults, **data})!r}),")
    path = LAB / f"inventory-{name}.py"
    path.write_text("\n".join(lines + ["]", "from operations.preflight import check_ssh_keys",
                                        "check_ssh_keys(lab)", ""]))
    return path


def only_listed() -> bool:
    """The share was asked nothing beyond the check made before any host is touched:
    folder listings, no download."""
    stats = seafile("GET", "stats")
    return stats["requests"] == stats["listings"] and stats["redirects"] == 0


def seafile(method, path, **kw):
    resp = requests.request(method, f"{SEAFILE}/_lab/{path}", timeout=10, **kw)
    resp.raise_for_status()
    return resp.json()


def share_files() -> dict:
    """{sha256: size} of every file the shares hold."""
    out = {}
    for f in (LAB / "share").rglob("*"):
        if f.is_file():
            out[hashlib.sha256(f.read_bytes()).hexdigest()] = f.stat().st_size
    return out


def weights_ok(lab, host, variant, install_dir="/opt/chatglm") -> bool:
    proc = lab.ssh(host, CHECK_WEIGHTS.format(d=model_dir(variant, install_dir)), check=False)
    return proc.returncode == 0 and proc.stdout.count(": OK") >= 2


def git(cwd, *args):
    env = {**GIT_ENV, "PATH": "/usr/bin:/bin", "GIT_LFS_SKIP_SMUDGE": "1",
           "GIT_AUTHOR_DATE": "2023-04-12T12:00:00+08:00",
           "GIT_COMMITTER_DATE": "2023-04-12T12:00:00+08:00"}
    return subprocess.run(["git", *args], cwd=cwd, env=env, check=True, capture_output=True,
                          text=True).stdout.strip()


def variant_repo(kind: str, name: str, transform) -> str:
    """A copy of THUDM/<name> served at lab-tests/<kind>/<name> with quantization.py rewritten,
    its new commit tagged <kind>; returns the commit."""
    work = LAB / "git-work" / kind / name
    bare = LAB / "git" / "lab-tests" / kind / name
    for d in (work, bare):
        shutil.rmtree(d, ignore_errors=True)
    work.parent.mkdir(parents=True, exist_ok=True)
    git(work.parent, "clone", "-q", str(LAB / "git" / "THUDM" / name), str(work))
    q = work / "quantization.py"
    q.write_text(transform(q.read_text()))
    git(work, "commit", "-q", "-am", f"quantization.py: {kind} shape of quantize()")
    git(work, "tag", kind)
    commit = git(work, "rev-parse", "HEAD")
    bare.parent.mkdir(parents=True, exist_ok=True)
    git(work.parent, "clone", "-q", "--bare", str(work), str(bare))
    return commit


def said(output: str, host: str, text: str) -> bool:
    """pyinfra printed text on a line of host's."""
    return any(re.match(rf"\s*\[{host}\]\s", line) and text in line
               for line in output.splitlines())


def clean(lab, hosts, install_dir):
    """No model under install_dir (a rerun of a test starts from scratch too)."""
    for host in hosts:
        lab.ssh(host, f"rm -rf {install_dir}")


@pytest.fixture
def fresh_share(lab):
    seafile("DELETE", "faults")
    seafile("DELETE", "stats")
    yield
    seafile("DELETE", "faults")


def test_control_cache_three_variants_rerun_and_dry_diff(lab, fresh_share):
    """int4 twice, int8, and fp16 (auto on an H100), one control cache: one download per file."""
    cache = LAB / "cache-control-test"
    shutil.rmtree(cache, ignore_errors=True)
    clean(lab, ("h15", "h16", "h17", "h18"), "/opt/chatglm")
    common = {"weights_mode": "control", "weights_cache": str(cache)}
    inv = inventory("control", {"h15": {**common, "variant": "int4"},
                                "h16": {**common, "variant": "int4"},
                                "h17": {**common, "variant": "int8"},
                                "h18": {**common, "variant": "auto"}})
    first = lab.deploy(inventory=inv)
    assert first.returncode == 0, first.stdout[-6000:]

    for host, variant in (("h15", "int4"), ("h16", "int4"), ("h17", "int8"), ("h18", "fp16")):
        assert weights_ok(lab, host, variant), host
    # Every distinct file crossed the wire once, whatever the number of hosts and variants
    # needing it (ice_text.model is the same in all three repos).
    stats = seafile("GET", "stats")
    shared = share_files()
    blobs = {p.name: p.stat().st_size for p in (cache / "blobs").iterdir()}
    assert set(blobs) <= set(shared) and len(blobs) == 5, blobs
    assert stats["bytes_sent"] == sum(blobs.values()), stats
    assert stats["redirects"] == len(blobs), stats
    # The kernel where quantization needs it, built from the serial source on this 2-core
    # machine's hosts; quantization.py loads it by absolute path.
    for host, variant in (("h15", "int4"), ("h17", "int8")):
        d = model_dir(variant)
        out = lab.ssh(host, f"ls {d}; grep -n '{MARK}' {d}/quantization.py").stdout
        assert "quantization_kernels.so" in out and f"'{d}/quantization_kernels.so'" in out
    assert "quantization_kernels" not in lab.ssh("h18", f"ls {model_dir('fp16')}").stdout

    # A rerun asks the share nothing but the check's listings and changes nothing.
    seafile("DELETE", "stats")
    second = lab.deploy(inventory=inv)
    assert second.returncode == 0, second.stdout[-4000:]
    t = totals(second.stdout)
    assert t["success"] == 0 and t["error"] == 0 and t["no_change"] == t["hosts"], t
    assert only_listed()

    # --dry --diff shows the patch of an unpatched quantization.py and changes nothing.
    d = model_dir("int4")
    lab.ssh("h15", f"git -C {d} checkout -- quantization.py")
    dry = lab.deploy("--dry", "--diff", "--limit", "h15", inventory=inv)
    assert dry.returncode == 0, dry.stdout[-3000:]
    assert f"Will modify {d}/quantization.py" in dry.stdout.replace("\x1b[1m", "").replace(
        "\x1b[0m", "")
    assert f'kwargs.setdefault("kernel_file", \'{d}/quantization_kernels.so\')' in dry.stdout
    assert lab.ssh("h15", f"grep -c '{MARK}' {d}/quantization.py", check=False).stdout.strip() == "0"


def test_direct_with_share_faults_mirror_and_floating_april_revision(lab, fresh_share):
    """direct through a token dying mid-file and a corrupted byte; mirror; a floating tag
    resolved on the host, pointing at the April 2023 shape of quantize()."""
    april = variant_repo("april", "chatglm-6b-int4", quantization_variants.april)
    bin4 = f"/{MODELS['int4']}/pytorch_model.bin"
    size = (LAB / "share" / "quantized" / bin4.strip("/")).stat().st_size
    seafile("POST", "faults", json=[{"match": bin4, "kind": "expire", "after": 65536},
                                     {"match": bin4, "kind": "corrupt", "offset": size // 2}])
    where = "/opt/t2"
    clean(lab, ("h15", "h16", "h17"), where)
    inv = inventory("direct", {
        "h15": {"variant": "int4", "weights_mode": "direct", "install_dir": where},
        "h16": {"variant": "int8", "weights_mode": "mirror", "weights_mirror": MIRROR,
                "install_dir": where},
        "h17": {"variant": "int4", "weights_mode": "mirror", "weights_mirror": MIRROR,
                "model_url": f"{GIT}/lab-tests/april/{{name}}", "install_dir": where,
                "model_revisions": {"int4": "april"}, "allow_floating_revision": True}})
    first = lab.deploy(inventory=inv)
    assert first.returncode == 0, first.stdout[-6000:]
    for host, variant in (("h15", "int4"), ("h16", "int8"), ("h17", "int4")):
        assert weights_ok(lab, host, variant, where), host

    stats = seafile("GET", "stats")
    # h15: 64 KiB, then the token died with the connection; a fresh redirect resumed the
    # rest, whose corrupted byte failed the sha256; one more full download.
    assert stats["per_file"].get(bin4) == 65536 + (size - 65536) + size, stats
    assert stats["redirects"] == 3 + 1, stats  # + ice_text.model
    # Mirror hosts never touch the share.
    assert not any("int8" in p for p in stats["per_file"]), stats
    assert seafile("GET", "faults")["faults"] == []

    # The floating tag was resolved on the host, and the April shape patched in its try block.
    d = model_dir("int4", where)
    assert lab.ssh("h17", f"git -C {d} rev-parse HEAD").stdout.strip() == april
    assert f"floating revision 'april' of {GIT}/lab-tests/april/chatglm-6b-int4 is {april}" \
        in first.stdout
    text = lab.ssh("h17", f"cat {d}/quantization.py").stdout
    ast.parse(text)
    lines = text.splitlines()
    first_mark, at = [i for i, line in enumerate(lines) if MARK in line]
    assert lines[first_mark - 1:first_mark + 1] == [  # load_cpu_kernel() itself, for every caller
        "def load_cpu_kernel(**kwargs):",
        f"    kwargs.setdefault(\"kernel_file\", '{d}/quantization_kernels.so')  {MARK}"]
    assert lines[at - 1:at + 2] == [
        "    try:", f"        kwargs.setdefault(\"kernel_file\", '{d}/quantization_kernels.so')  {MARK}",
        "        load_cpu_kernel(**kwargs)"], lines[at - 1:at + 2]

    second = lab.deploy(inventory=inv)
    t = totals(second.stdout)
    assert second.returncode == 0 and t["success"] == 0 and t["no_change"] == t["hosts"], \
        second.stdout[-4000:]


def test_failures_are_clear_and_leave_no_wrong_file(lab, fresh_share):
    """A share answering 500, a file missing from the share, too little disk, and a
    quantization.py the patch does not know: each fails its host with the reason, and no
    pointer is replaced by anything unverified. (Too little GPU memory for the variant is
    bad inventory data: it stops the whole run, tests/test_faults_lab.py.)"""
    bin8 = f"/{MODELS['int8']}/pytorch_model.bin"
    seafile("POST", "faults", json=[{"match": bin8, "kind": "status", "code": 500, "times": -1}])
    variant_repo("broken", "chatglm-6b-int8", quantization_variants.no_call)
    shard = LAB / "share" / "fp16" / "pytorch_model-00002-of-00002.bin"
    hidden = shard.with_name("hidden.bin")
    shard.rename(hidden)
    where = "/opt/t3"
    clean(lab, ("h15", "h16", "h18"), where)
    lab.ssh("h20", "mkdir -p /opt/small && (mountpoint -q /opt/small || "
                   "mount -t tmpfs -o size=16m tmpfs /opt/small)")
    try:
        inv = inventory("failures", {
            "h15": {"variant": "int8", "weights_mode": "direct", "weights_attempts": 2,
                   "install_dir": where},
            # Past the check before the run (which would stop it: test_faults_lab.py), the
            # download itself must name the missing file too.
            "h18": {"variant": "fp16", "weights_mode": "control", "install_dir": where,
                    "weights_cache": str(LAB / "cache-failures-test"), "check_sources": False},
            "h20": {"variant": "int4", "install_dir": "/opt/small/chatglm"},
            "h16": {"variant": "int8", "weights_mode": "mirror", "weights_mirror": MIRROR,
                    "model_url": f"{GIT}/lab-tests/broken/{{name}}", "install_dir": where,
                    "model_revisions": {"int8": "broken"}, "allow_floating_revision": True}})
        shutil.rmtree(LAB / "cache-failures-test", ignore_errors=True)
        run = lab.deploy(inventory=inv)
    finally:
        hidden.rename(shard)
        lab.ssh("h20", "umount /opt/small", check=False)
    out = run.stdout
    (LAB / "failures-run.log").write_text(out)  # for a look when an assertion below fails
    # Every host failed, so pyinfra ends with "No hosts remaining" instead of its table.
    assert run.returncode != 0 and "No hosts remaining" in out, out[-6000:]

    # h15: the share answered 500 to every try.
    assert said(out, "h15", "ERROR: pytorch_model.bin: got 0 of 321267 bytes; 2 tries in a row "
                           "brought nothing (last: dl=1 answered HTTP 500); rerun to resume")
    d8 = model_dir("int8", where)
    pointer = lab.ssh("h15", f"head -c 40 {d8}/pytorch_model.bin").stdout
    assert pointer.startswith("version https://git-lfs")
    assert lab.ssh("h15", f"test -e {d8}/.chatglm-verified/pytorch_model.bin", check=False).returncode

    # h18: the listing lacks a shard: named, with what the folder holds.
    assert said(out, "h18", "weights: 'pytorch_model-00002-of-00002.bin' is not in folder '/'")
    shard2 = f"{model_dir('fp16', where)}/pytorch_model-00002-of-00002.bin"
    assert lab.ssh("h18", f"head -c 40 {shard2}").stdout.startswith("version https://git-lfs")

    # h20: stopped before anything was installed or downloaded.
    assert said(out, "h20", "ERROR: h20: the weights need 5.00 GB (data/models.toml) under "
                            "/opt/small/chatglm/models/chatglm-6b-int4, 0.02 GB are free. Fix: ")
    assert lab.ssh("h20", f"ls {where} /opt/small/chatglm", check=False).stdout == ""

    # h16: the weights are in; the patch names the file and the line it needs.
    assert weights_ok(lab, "h16", "int8", where)
    assert said(out, "h16", f"ERROR: {d8}/quantization.py: the line 'load_cpu_kernel(**kwargs)' "
                            "(in quantize()) was not found")
    assert MARK not in lab.ssh("h16", f"cat {d8}/quantization.py").stdout

    # Nothing was served for the hosts that stopped early, nor past the 500s.
    stats = seafile("GET", "stats")
    assert bin8 not in stats["per_file"] and not any("int4" in p for p in stats["per_file"]), stats
