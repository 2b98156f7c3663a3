"""Spec tests for the Python stage (operations/pyenv.py): conda and venv, torch, locks, verify.

Same style and fake host as tests/test_gpu_specs.py: each file in tests/specs/pyenv/
names an operation, the host data it runs with, the facts a fake host answers with and
the exact commands the operation must yield. Nothing connects anywhere. This is how the
conda backend is tested: conda channels and installers cannot be reached from the lab.

Spec keys (beyond those of test_gpu_specs):
  args        {"s": host data, "plan": a literal GPU plan or {"resolve": {...}} as in the
              GPU specs; default: a CPU-only host}. The operation gets
              py = operations.pyplan.python_plan(settings, plan).
  py_expect   subset the Python plan must contain
  facts       as in the GPU specs, plus two stand-ins that keep specs valid when a lock file
              is edited: {"$sha1_of_lock": name} (the sha1 of what the deploy uploads as
              requirements.lock) and, inside a PipFreeze value, "$lock": name (every pin of
              that lock, the other keys added or overriding)
"""

import hashlib
import json
import subprocess
from pathlib import Path

import pytest

from operations import pyenv
from operations.pyplan import PythonPlan, lock_path, python_plan, read_lock
from operations.resolver import GpuPlan
from operations.checks import settings_for
from tests.spec_harness import FakeDataHost, check_spec, run_op
from tests.test_gpu_specs import HOST, build_plan

SPECS = Path(__file__).resolve().parent / "specs" / "pyenv"
SPEC_FILES = sorted(SPECS.glob("*.json"))



def build_py(spec: dict) -> PythonPlan:
    args = spec.get("args", {})
    s = settings_for(FakeDataHost(HOST, args.get("s", {})))
    plan = build_plan(args["plan"]) if "plan" in args else GpuPlan()
    return python_plan(s, plan)


def expand(value):
    """The stand-ins of a fact value (see the module doc) made real."""
    if isinstance(value, dict) and "$sha1_of_lock" in value:
        text = read_lock(lock_path(value["$sha1_of_lock"]))["text"]
        return hashlib.sha1(text.encode()).hexdigest()
    if isinstance(value, dict) and "$lock" in value:
        pins = dict(read_lock(lock_path(value["$lock"]))["pins"])
        pins.update({k: v for k, v in value.items() if k != "$lock"})
        return pins
    return value


def run_spec(spec: dict):
    py = build_py(spec)
    for key, value in spec.get("py_expect", {}).items():
        assert getattr(py, key) == value, f"python plan.{key} = {getattr(py, key)!r}"
    facts = {k: expand(v) for k, v in spec.get("facts", {}).items()}
    op = getattr(pyenv, spec["op"].split(".")[1])
    # conda takes the installer's values and the install directory, the others the plan.
    args = ({"install_dir": py.install_dir, **{k: v for k, v in vars(py.conda).items() if k != "installer"}}
            if op is pyenv.conda else {"py": py})
    return run_op(op, args, HOST, facts,
                  executing=spec.get("executing", False), fail_in=[pyenv], catch="raises" in spec)


@pytest.mark.parametrize("path", SPEC_FILES, ids=[p.stem for p in SPEC_FILES])
def test_spec(path):
    spec = json.loads(path.read_text())
    check_spec(spec, *run_spec(spec))


def test_every_operation_has_specs():
    ops = {json.loads(p.read_text())["op"] for p in SPEC_FILES}
    assert {"pyenv.conda", "pyenv.env", "pyenv.packages", "pyenv.verify"} <= ops, ops
    assert len(SPEC_FILES) >= 30, len(SPEC_FILES)


def test_every_spec_is_well_formed():
    allowed = {"op", "description", "args", "py_expect", "executing", "facts", "commands",
               "noop", "raises"}
    for path in SPEC_FILES:
        spec = json.loads(path.read_text())
        assert set(spec) <= allowed, (path.name, set(spec) - allowed)
        assert sum(k in spec for k in ("commands", "noop", "raises")) == 1, path.name
        assert spec.get("description"), path.name


@pytest.mark.parametrize("right", [False, True], ids=["other_bytes", "pinned_bytes"])
def test_conda_installer_check_runs_in_bash(tmp_path, right):
    """The installer's sha256 check, as the conda spec yields it, run by bash on a real file:
    other bytes fail naming the setting and the fix; the pinned bytes pass."""
    spec = json.loads((SPECS / "conda-miniconda_own_sha.json").read_text())
    check = next(c for c in run_spec(spec)[0] if isinstance(c, str) and "SHA256" in c)
    path = "/opt/chatglm/.Miniconda3-py311_24.5.0-0-Linux-x86_64.sh"
    pinned = spec["args"]["s"]["conda_installer_sha256"]
    installer = tmp_path / "installer.sh"
    installer.write_bytes(b"#!/bin/sh\necho installer\n")
    actual = hashlib.sha256(installer.read_bytes()).hexdigest()
    command = check.replace(path, str(installer))
    if right:  # the same check, pinned to the bytes the file holds
        command = command.replace(pinned, actual)
    done = subprocess.run(["bash", "-c", command], capture_output=True, text=True)
    if right:
        assert done.returncode == 0, done.stderr
        assert "ERROR" not in done.stderr
    else:
        assert done.returncode == 1
        assert "SHA256 did not match!" in done.stdout
        assert "does not have the sha256 " + pinned in done.stderr
        assert "Fix: set conda_installer_sha256" in done.stderr
