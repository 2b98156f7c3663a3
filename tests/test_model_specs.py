"""Spec tests for the model and kernel operations (operations/model.py, operations/kernel.py).

As in tests/test_gpu_specs.py, through tests/spec_harness.py: each operation's generator
runs against a fake host whose facts the test gives, and the commands it yields are
compared; nothing connects anywhere.
The lab tests (tests/test_model_lab.py) run the same operations for real.
"""

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import pytest
from pyinfra.api.command import FileUploadCommand

from operations import kernel, model
from operations.resolver import GpuPlan
from operations.checks import settings_for
from operations.settings import VERIFIED, SettingError, mirror_url, source_for
from tests import quantization_variants
from tests.spec_harness import FakeDataHost, FakeHost, run_op
from tests.spec_harness import render as render_spec

ROOT = Path(__file__).resolve().parent.parent
HOST = "model-test"
C1, C2 = "a" * 40, "b" * 40
URL = "git://git.example/THUDM/chatglm-6b-int4"
D = "/opt/chatglm/models/chatglm-6b-int4"
OID = "1" * 64
SHARE = "https://cloud.example/d/674208019e314311ab5c/"
CPU = GpuPlan()
GB = 10 ** 9


class Host(FakeHost):
    def __init__(self, *args):
        super().__init__(*args)
        self.logged = []

    def log_styled(self, message, **kwargs):
        self.logged.append(message)


def render(command):
    if isinstance(command, FileUploadCommand) and isinstance(command.src, str):
        return {"upload": command.dest, "src": command.src}  # a control-cache blob, not there yet
    return render_spec(command)


def run(op, facts=None, executing=False, **args):
    """(commands, fake host) of op._inner(**args); fail() is rendered as {"fail": message}."""
    commands, fake, _ = run_op(op, args, HOST, facts or {}, executing=executing,
                               fail_in=(model, kernel), fake_class=Host, render=render)
    return commands, fake


def settings(**data):
    return settings_for(FakeDataHost(HOST, data))


def lfs(actual=-1, verified="-", size=1000, oid=OID):
    return {"pytorch_model.bin": {"oid": oid, "size": size, "actual": actual, "verified": verified}}


# --- clone ---------------------------------------------------------------------------------

def test_clone_fresh_checks_out_the_pin_without_smudge():
    commands, fake = run(model.clone, {f"model.GitHead(path={D})": ""}, url=URL, dest=D, revision=C1)
    run_id = fake.state.chatglm.info["run"]
    # What stands at dest first: an empty directory goes, a clone cut short is moved aside,
    # anything else fails the host, named; then the leftovers of earlier runs' clones.
    assert f"rmdir {D};" in commands[0] and f"mv -T {D} {D}.broken-{run_id}" in commands[0]
    assert "is not a git checkout (it holds: " in commands[0]
    assert f"rm -rf -- {D}.partial {D}.partial-*" in commands[1]
    partial = f"{D}.partial-{run_id}"
    assert commands[2] == f"GIT_LFS_SKIP_SMUDGE=1 git clone --quiet --no-checkout {URL} {partial}"
    assert commands[3].endswith(f"checkout --quiet --detach {C1}")
    assert commands[4] == f"mv -T {partial} {D}"
    assert f'[ "$head" = {C1} ]' in commands[5] and "not the pinned" in commands[5]


def test_clone_leaves_room_for_the_checkout_or_names_what_is_in_the_way(tmp_path):
    """_clear_dest run by sh on real directories (names with a space and a quote)."""
    base = tmp_path / "it's here"
    for name in ("empty", "full", "cut"):
        (base / name).mkdir(parents=True)
    (base / "full" / "a file").write_text("x")
    subprocess.run(["git", "init", "-q", str(base / "cut")], check=True)

    def clear(name):
        command = model._clear_dest(str(base / name), "r1").get_raw_value()
        return subprocess.run(command, shell=True, capture_output=True, text=True)

    assert clear("empty").returncode == 0 and not (base / "empty").exists()
    cut = clear("cut")
    assert cut.returncode == 0 and not (base / "cut").exists()
    assert (base / "cut.broken-r1" / ".git").is_dir() and "cut.broken-r1" in cut.stderr
    full = clear("full")
    assert full.returncode == 1 and (base / "full" / "a file").exists()
    assert full.stderr.strip() == (f"ERROR: {base}/full exists and is not a git checkout (it "
                                   "holds: a file ); Fix: move it away or remove it, then rerun "
                                   "the deploy")
    assert clear("absent").returncode == 0


def test_clone_at_the_pin_is_a_noop():
    commands, fake = run(model.clone, {f"model.GitHead(path={D})": C1}, url=URL, dest=D,
                         revision=C1)
    assert commands == [] and fake.noops == [f"{D} is at {C1[:12]}"]


def test_clone_moves_an_existing_checkout_and_drops_its_stamps():
    commands, _ = run(model.clone, {f"model.GitHead(path={D})": C2}, url=URL, dest=D, revision=C1)
    assert commands[0] == f"git -C {D} remote set-url origin {URL}"
    assert commands[2].endswith(f"checkout --quiet --force --detach {C1}")
    assert commands[3] == f"rm -rf {D}/.chatglm-verified"


def test_floating_revision_refused_without_permission():
    commands, _ = run(model.clone, {}, url=URL, dest=D, revision="main")
    assert "allow_floating_revision=True" in commands[-1]["fail"]


REFS = {"refs/tags/v1.1.0": "c" * 40, "refs/tags/v1.1.0^{}": C1, "refs/heads/main": C2,
        "refs/heads/dev": C1, "refs/tags/dev": C2}


@pytest.mark.parametrize("ref, commit, why", [
    ("v1.1.0", C1, ""),            # annotated tag: the commit it points at
    ("main", C2, ""),
    ("dev", "", "ambiguous"),     # a branch and a tag of one name, different commits
    ("nope", "", "no branch or tag 'nope'"),
])
def test_resolve_ref(ref, commit, why):
    got, reason = model.resolve_ref(REFS, ref)
    assert got == commit and why in reason


def test_floating_revision_resolved_on_the_host():
    facts = {f"model.RemoteRefs(ref=v1.1.0, url={URL})": REFS, f"model.GitHead(path={D})": C1}
    commands, fake = run(model.clone, facts, url=URL, dest=D, revision="v1.1.0",
                         allow_floating=True)
    assert commands == [] and fake.noops  # the tag's commit is checked out already
    assert f"floating revision 'v1.1.0' of {URL} is {C1}" in fake.logged[0]


def test_floating_revision_unknown_fails_at_execution():
    facts = {f"model.RemoteRefs(ref=v9, url={URL})": REFS}
    commands, _ = run(model.clone, facts, executing=True, url=URL, dest=D, revision="v9",
                      allow_floating=True)
    assert commands == [{"fail": f"{URL}: no branch or tag 'v9'; fix model_revision(s)/code_revision"}]


def test_floating_revision_before_git_is_installed_is_a_change():
    facts = {f"model.RemoteRefs(ref=main, url={URL})": {}, f"model.GitHead(path={D})": ""}
    commands, _ = run(model.clone, facts, url=URL, dest=D, revision="main", allow_floating=True)
    assert commands and commands[3].endswith("--detach main")


def test_settings_refuse_a_floating_ref_naming_host_setting_and_fix():
    with pytest.raises(SettingError) as info:
        source_for(settings(model_revision="main", code_revision=C1), "int4")
    text = str(info.value)
    assert HOST in text and "'model_revision'" in text and "Fix:" in text
    assert "allow_floating_revision=True" in text
    src = source_for(settings(model_revision="main", code_revision="v1.1.0",
                              allow_floating_revision=True), "int4")
    assert (src["model_revision"], src["code_revision"]) == ("main", "v1.1.0")


@pytest.mark.parametrize("data, setting", [
    ({"weights_mirror": "ftp://mirror.lan/models/", "weights_mode": "mirror"}, "weights_mirror"),
    ({"weights_mode": "mirror"}, "weights_mirror"),
    ({"weights_attempts": 0}, "weights_attempts"),
    ({"weights_mode": "torrent"}, "weights_mode"),
])
def test_bad_weights_settings(data, setting):
    with pytest.raises(SettingError, match=f"'{setting}'"):
        settings(**data)


def test_mirror_url():
    assert mirror_url("http://m.lan/models", "chatglm-6b-int4") == \
        "http://m.lan/models/chatglm-6b-int4/"
    assert mirror_url("http://m.lan/{name}/main/", "chatglm-6b") == "http://m.lan/chatglm-6b/main/"
    src = source_for(settings(weights_mirror="http://m.lan/w/", code_revision=C1,
                              model_revision=C2), "int8")
    assert src["mirror"] == "http://m.lan/w/chatglm-6b-int8/"


# --- variant and resources -----------------------------------------------------------------

@pytest.mark.parametrize("mib, variant", [(81559, "fp16"), (16384, "fp16"), (12288, "int8"),
                                          (10240, "int8"), (8192, "int4"), (4096, "int4")])
def test_auto_variant_by_gpu_memory(mib, variant):
    plan = GpuPlan(gpu=True, gpus=[{"name": "x", "memory_mib": mib}])
    assert model.auto_variant(plan, 0) == variant


def test_auto_variant_cpu_is_int4():
    assert model.auto_variant(CPU, 512 * GB) == "int4"


def resources(variant="int4", free=100 * GB, files=None, executing=True, **data):
    facts = {f"model.LfsFiles(path={D})": files or {}, f"system.FreeDiskBytes(path={D})": free}
    s = settings(**data)
    return run(model.check_resources, facts, executing=executing, weights_mode=s.weights_mode,
               weights_cache=s.weights_cache,
               variant=variant, model_dir=D)


def memory_error(chosen, plan=CPU, ram=64 * GB, **data) -> str:
    """check_memory's SettingError text for the variant chosen ('' when memory suffices)."""
    try:
        model.check_memory(settings(**data), chosen, plan, ram)
    except SettingError as error:
        return str(error)
    return ""


def test_resources_suffice(tmp_path):
    commands, fake = resources(weights_cache=str(tmp_path))
    assert commands == [] and "disk space suffices" in fake.noops[0]


def test_too_little_gpu_memory_stops_the_run_at_collection():
    plan = GpuPlan(gpu=True, gpus=[{"name": "Tesla T4", "memory_mib": 15360}])
    assert memory_error("int8", plan) == memory_error("fp16", plan) == ""
    plan.gpus[0]["memory_mib"] = 8192
    message = memory_error("int8", plan, variant="int8")
    assert message.startswith(f"host '{HOST}': setting 'variant' = 'int8' needs 10 GB of GPU "
                              "memory, GPU 0 (Tesla T4) has 8.6 GB. Fix: set variant to a smaller")
    # auto picked int4 and even that does not fit: the setting named is still variant.
    plan.gpus[0]["memory_mib"] = 4096
    assert "setting 'variant (auto)' = 'int4' needs 6 GB" in memory_error("int4", plan)
    assert memory_error("int8", plan, check_memory=False) == ""


def test_unknown_gpu_memory_asks_for_gpu_memory_mib():
    plan = GpuPlan(gpu=True, gpus=[{"name": "NVIDIA device 0x1f99", "memory_mib": 0}])
    message = memory_error("int4", plan)
    assert "has 0.0 GB" in message and "set gpu_memory_mib for this host" in message


def test_too_little_ram_on_a_cpu_host():
    assert "'fp16' on CPU needs 32 GB of RAM, the host has 24.0 GB" in memory_error(
        "fp16", ram=24 * GB)


def test_too_little_disk_estimated_before_the_clone_exact_after():
    commands, _ = resources(free=4 * GB, weights_mode="direct")
    assert "the weights need 5.00 GB (data/models.toml)" in commands[-1]["fail"]
    # Cloned: the pointers say 1000 bytes; a verified file needs nothing.
    assert resources(free=2000, files=lfs(), weights_mode="direct")[0] == []
    commands, _ = resources(free=999, files=lfs(), weights_mode="direct")
    assert "the weights need 0.00 GB (the LFS pointers)" in commands[-1]["fail"]
    assert resources(free=0, files=lfs(1000, OID), weights_mode="direct")[0] == []


def test_control_cache_space_is_checked(tmp_path):
    usage = SimpleNamespace(total=0, used=0, free=GB)
    with mock.patch.object(model.shutil, "disk_usage", return_value=usage):
        commands, _ = resources(weights_cache=str(tmp_path / "cache"))
    assert f"the control cache {tmp_path / 'cache'} needs 5.00 GB, 1.00 GB are free" \
        in commands[-1]["fail"]
    # A blob already in the cache needs no space.
    blobs = tmp_path / "cache" / "blobs"
    blobs.mkdir(parents=True)
    (blobs / OID).write_bytes(b"x" * 1000)
    with mock.patch.object(model.shutil, "disk_usage", return_value=SimpleNamespace(free=0)):
        assert resources(files=lfs(), weights_cache=str(tmp_path / "cache"))[0] == []


def test_collection_logs_the_shortage_for_dry_runs():
    _, fake = resources(free=GB, executing=False, weights_mode="direct")
    assert "the weights need 5.00 GB" in fake.logged[0]


# --- weights -------------------------------------------------------------------------------

INDEXED = {"head": C2, "indexed": True}


def weights(files, free=100 * GB, executing=True, extra_facts=None, index=INDEXED, **data):
    s = settings(code_revision=C1, model_revision=C2, **data)
    facts = {f"model.LfsFiles(path={D})": files, f"system.FreeDiskBytes(path={D})": free,
             f"model.PointerIndex(path={D})": index, **(extra_facts or {})}
    return run(model.weights, facts, executing=executing, s=s, model_dir=D, share=SHARE,
               share_path="/chatglm-6b-int4/", mirror="http://m.lan/chatglm-6b-int4/")


def test_weights_verified_is_a_noop():
    commands, fake = weights(lfs(1000, OID))
    assert commands == [] and fake.noops == [f"1 weight files verified in {D}"]


def test_weights_verified_but_not_indexed_writes_the_index_only():
    commands, fake = weights(lfs(1000, OID), index={"head": C2, "indexed": False})
    assert fake.noops == [] and len(commands) == 1
    index = f"{D}/.chatglm-verified/.pointers-{C2}"
    assert f"> {index}.tmp && mv -f {index}.tmp {index}" in commands[0]
    assert f"{OID} 1000 pytorch_model.bin" in commands[0]
    # A branch checked out (no detached commit): nothing to index, nothing to do.
    commands, fake = weights(lfs(1000, OID), index={"head": "", "indexed": False})
    assert commands == [] and fake.noops


def test_weights_not_cloned_yet():
    assert weights({}, executing=False)[1].noops
    assert "has no LFS-tracked files" in weights({})[0][-1]["fail"]


def test_weights_control_mode():
    commands, _ = weights(lfs(), weights_cache="/var/cache/w")
    assert commands[0] == f"mkdir -p {D}/.chatglm-verified"
    assert commands[1] == {"function": "fetch_to_cache"}
    assert commands[2] == {"upload": f"{D}/.pytorch_model.bin.partial",
                           "src": f"/var/cache/w/blobs/{OID}"}
    assert f'echo "{OID}  "{D}/.pytorch_model.bin.partial | sha256sum -c' in commands[3]
    assert f"mv -f {D}/.pytorch_model.bin.partial {D}/pytorch_model.bin" in commands[3]
    assert len(commands) == 4


@pytest.mark.parametrize("mode, kind, source", [("direct", "seafile", SHARE),
                                                ("mirror", "mirror", "http://m.lan/chatglm-6b-int4/")])
def test_weights_on_the_host(mode, kind, source):
    script, job = "/opt/chatglm/bin/fetch.py", "/opt/chatglm/bin/fetch-chatglm-6b-int4.json"
    facts = {f"files.File(path={script})": None, f"files.Directory(path={script})": None,
             f"files.File(path={job})": None, f"files.Directory(path={job})": None,
             "files.Directory(path=/opt/chatglm/bin)": {"mode": 755}}
    data = {"weights_mirror": "http://m.lan/"} if mode == "mirror" else {}
    commands, _ = weights(lfs(), extra_facts=facts, weights_mode=mode, weights_attempts=3, **data)
    # The downloader as it is in the repository, and its job.
    assert commands[1] == {"upload": script, "src": str(model.FETCH)}
    upload = [c for c in commands if isinstance(c, dict) and c.get("upload") == job][0]
    assert json.loads(upload["content"]) == {
        "mode": kind, "source": source, "folder": "/chatglm-6b-int4/", "model_dir": D, "stamps": VERIFIED, "attempts": 3,
        "files": [{"name": "pytorch_model.bin", "oid": OID, "size": 1000}]}
    # Run so that its progress lines show as they come, at the default verbosity.
    assert commands[-1] == {"function": "_run_shown", "command": f"python3 {script} {job}"}


def test_weights_too_little_disk_fails_before_downloading():
    commands, _ = weights(lfs(), free=999)
    assert commands == [{"fail": f"{D}: 0.00 GB free, the weights need 0.00 GB; free space "
                                 "there or set install_dir to a larger filesystem"}]


def test_weights_of_the_right_size_are_hashed_in_place_not_downloaded():
    commands, _ = weights(lfs(1000, "-"), free=0)
    assert commands[0] == f"mkdir -p {D}/.chatglm-verified"
    assert "sha256sum -c --quiet" in commands[1] and commands[1].endswith("; true'")
    # The fake's LfsFiles does not change: the download follows, as it would after a mismatch.
    assert commands[2] == {"function": "fetch_to_cache"}


# --- kernel patch --------------------------------------------------------------------------

FIXTURE = (ROOT / "lab" / "fixtures" / "chatglm" / "quantization.py").read_text()
KERNEL = f"{D}/quantization_kernels.so"
Q = f"{D}/quantization.py"


@pytest.mark.parametrize("shape", ["final", "april"])
def test_patch_both_upstream_shapes(shape):
    text = FIXTURE if shape == "final" else quantization_variants.april(FIXTURE)
    new = kernel.patched(text, Q, KERNEL)
    compile(new, Q, "exec")
    lines = new.split("\n")
    marks = [i for i, line in enumerate(lines) if kernel.MARK in line]
    # One line opens load_cpu_kernel() (the modeling code calls it too), one precedes the call.
    assert len(marks) == 2 and lines[marks[0] - 1] == kernel.DEF
    at = marks[1]
    assert lines[at + 1].strip() == "load_cpu_kernel(**kwargs)"
    assert lines[at].startswith(lines[at + 1][: len(lines[at + 1]) - len(lines[at + 1].lstrip())])
    assert len(new.split("\n")) == len(text.split("\n")) + 2
    assert kernel.patched(new, Q, KERNEL) == new  # idempotent
    # Another kernel path (say, now 4 cores: the parallel kernel) replaces the lines.
    other = kernel.patched(new, Q, KERNEL.replace(".so", "_parallel.so"))
    assert other.count(kernel.MARK) == 2 and other.count("_parallel.so") == 2


def patch_facts(text, tmp_path):
    """The facts patch_quantization reads for a quantization.py of this text, PatchLines
    from its real command (grep) run on a copy."""
    copy = tmp_path / "quantization.py"
    copy.write_text(text)
    command = kernel.PatchLines().command(path=str(copy))
    out = subprocess.run(["sh", "-c", command], capture_output=True, text=True).stdout
    return {"system.CpuCount": 2, f"files.FileContents(path={Q})": text.removesuffix("\n").split("\n"),
            f"kernel.PatchLines(path={Q})": kernel.PatchLines().process(out.splitlines()),
            f"files.File(path={Q})": {"mode": 644}}


def test_patch_operation_and_unknown_file(tmp_path):
    facts = patch_facts(FIXTURE, tmp_path)
    with mock.patch.object(kernel.files.put, "_inner", lambda **kw: iter([f"put {kw['dest']}"])):
        commands, _ = run(kernel.patch_quantization, facts, executing=True, model_dir=D)
    assert commands == [f"put {Q}"]
    patched = kernel.patched(FIXTURE, Q, KERNEL)
    commands, fake = run(kernel.patch_quantization, patch_facts(patched, tmp_path), model_dir=D)
    assert commands == [] and fake.noops == [f"{Q} already loads {KERNEL}"]
    assert f"files.FileContents(path={Q})" not in fake.asked  # the grep sufficed
    broken = quantization_variants.no_call(FIXTURE)
    commands, _ = run(kernel.patch_quantization, patch_facts(broken, tmp_path),
                      executing=True, model_dir=D)
    message = commands[-1]["fail"]
    assert message.startswith(f"{Q}: the line 'load_cpu_kernel(**kwargs)' (in quantize()) was "
                              "not found")


def test_patch_lines_agree_with_the_whole_file(tmp_path):
    """is_patched (from the grep) says "unchanged" exactly when patched() of the whole file
    would leave it as it is, whatever was done to the mark line."""
    final = kernel.patched(FIXTURE, Q, KERNEL)
    april = kernel.patched(quantization_variants.april(FIXTURE), Q, KERNEL)
    mark = next(line for line in final.split("\n") if kernel.MARK in line)
    texts = {
        "unpatched": FIXTURE, "final": final, "april": april,
        "other kernel": kernel.patched(FIXTURE, Q, KERNEL.replace(".so", "_parallel.so")),
        "mark twice": final.replace(mark, mark + "\n" + mark),
        "mark moved": final.replace(mark + "\n", "", 1).replace("import ", mark + "\nimport ", 1),
        "mark indented differently": final.replace(mark, "  " + mark),
        "mark with trailing space": final.replace(mark, mark + " "),
        "no call": quantization_variants.no_call(FIXTURE),
    }
    for name, text in texts.items():
        lines = patch_facts(text, tmp_path)[f"kernel.PatchLines(path={Q})"]
        try:
            unchanged = kernel.patched(text, Q, KERNEL) == text
        except Exception:
            unchanged = False
        assert kernel.is_patched(lines, KERNEL) == unchanged, name
    assert kernel.is_patched(patch_facts(final, tmp_path)[f"kernel.PatchLines(path={Q})"], KERNEL)


def int4_copy(src: Path, work: Path, quantization: str) -> Path:
    """The int4 fixture model (weights linked) with quantization.py replaced."""
    work.mkdir(parents=True)
    for f in src.iterdir():
        if f.suffix in (".bin", ".model"):
            (work / f.name).symlink_to(f)
        else:
            (work / f.name).write_bytes(f.read_bytes())
    (work / "quantization.py").write_text(quantization)
    return work


def test_patched_models_load_the_prebuilt_kernel(tmp_path):
    """Loaded as the smoke test loads them, both upstream shapes of quantize(), once patched,
    take the prebuilt kernel: no 'No compiled kernel found', no gcc. Unpatched, the fixture
    compiles as upstream does (so the check can see it)."""
    from lab.lab import ensure_fixtures

    src = Path(ensure_fixtures()["int4"]["dir"])
    so = tmp_path / "quantization_kernels.so"
    subprocess.run(["gcc", "-O3", "-fPIC", "-pthread", "-fopenmp", "-std=c99",
                    str(src / "quantization_kernels.c"), "-shared", "-o", str(so)], check=True)
    dirs = {
        "unpatched": int4_copy(src, tmp_path / "unpatched", FIXTURE),
        "final": int4_copy(src, tmp_path / "final", kernel.patched(FIXTURE, Q, str(so))),
        "april": int4_copy(src, tmp_path / "april", kernel.patched(
            quantization_variants.april(FIXTURE), Q, str(so))),
    }
    code = ("import sys\nfrom transformers import AutoModel\n"
            "for d in sys.argv[1:]:\n"
            "    print('=== ' + d, flush=True)\n"
            "    model = AutoModel.from_pretrained(d, trust_remote_code=True).float()\n"
            "    print('--- again', flush=True)\n"
            "    model.quantize(4)  # already quantized, on the CPU: the kernel is loaded again\n"
            "    print(flush=True)\n")
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", code, *map(str, dirs.values())], text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                          timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:]
    out = {name: part for name, part in zip(dirs, proc.stdout.split("=== ")[1:])}
    assert out["unpatched"].split("--- again")[1].count("No compiled kernel found") == 1
    for shape in ("final", "april"):
        assert "No compiled kernel found" not in out[shape] and "Compiling" not in out[shape]
        first, again = out[shape].split("--- again")
        assert f"Load kernel : {so}" in first and f"Load kernel : {so}" in again, out[shape]
