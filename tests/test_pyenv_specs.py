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
from contextlib import ExitStack
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import pytest
from pyinfra.context import ctx_host, ctx_state

from operations import pyenv
from operations.pyplan import lock_path, python_plan, read_lock
from operations.settings import settings_for
from tests.test_gpu_specs import (HOST, FailCommand, FakeDataHost, FakeHost, build_plan, matches,
                                  render)

SPECS = Path(__file__).resolve().parent / "specs" / "pyenv"
SPEC_FILES = sorted(SPECS.glob("*.json"))
CPU_PLAN = {"gpu": False, "torch_tag": "cpu"}


def build_py(spec: dict) -> dict:
    args = spec.get("args", {})
    s = settings_for(FakeDataHost(HOST, args.get("s", {})))
    plan = build_plan(args["plan"]) if "plan" in args else dict(CPU_PLAN)
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
    op = getattr(pyenv, spec["op"].split(".")[1])
    py = build_py(spec)
    for key, value in spec.get("py_expect", {}).items():
        assert py.get(key) == value, f"python plan[{key!r}] = {py.get(key)!r}"
    config = SimpleNamespace(DIFF=False, TEMP_DIR="/tmp", SUDO=False)
    state = SimpleNamespace(is_executing=spec.get("executing", False), config=config,
                            cwd=str(Path(__file__).resolve().parent.parent))
    fake = FakeHost(HOST, {k: expand(v) for k, v in spec.get("facts", {}).items()}, state)
    commands, error = [], None
    with ExitStack() as stack:
        stack.enter_context(mock.patch.object(pyenv, "fail", FailCommand))
        stack.enter_context(ctx_state.use(state))
        stack.enter_context(ctx_host.use(fake))
        try:
            for command in op._inner(py=py):
                commands.append(render(command))
        except Exception as exc:  # noqa: BLE001 - the spec says which
            if "raises" not in spec:
                raise
            error = exc
    return commands, fake, error


@pytest.mark.parametrize("path", SPEC_FILES, ids=[p.stem for p in SPEC_FILES])
def test_spec(path):
    spec = json.loads(path.read_text())
    commands, fake, error = run_spec(spec)
    if "raises" in spec:
        fails = [c for c in commands if isinstance(c, dict) and "fail" in c]
        if error is None and fails:
            assert commands[-1] is fails[-1], f"commands after fail(): {commands}"
            error = fails[-1]["fail"]
        assert error is not None, f"expected a failure, got commands {commands}, noops {fake.noops}"
        wanted = spec["raises"] if isinstance(spec["raises"], list) else [spec["raises"]]
        for text in wanted:
            assert text in str(error), f"{text!r} not in the error: {error}"
        return
    if spec.get("noop"):
        assert commands == [], f"expected a noop, got {commands}"
        assert fake.noops, "no host.noop() for an operation that changes nothing"
        if isinstance(spec["noop"], str):
            assert any(spec["noop"] in n for n in fake.noops), fake.noops
        return
    expected = spec["commands"]
    assert len(commands) == len(expected) and all(map(matches, expected, commands)), (
        "commands differ:\n  got      " + json.dumps(commands, indent=1, ensure_ascii=False)
        + "\n  expected " + json.dumps(expected, indent=1, ensure_ascii=False))


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
