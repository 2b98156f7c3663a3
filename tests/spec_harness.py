"""The fake host the spec tests run operations against (tests/test_*_specs.py).

In the style of pyinfra's own operation tests: an operation's undecorated generator
(``op._inner``) runs with ``pyinfra.host`` and ``pyinfra.state`` bound to fakes; the facts
come from the spec, the commands it yields are rendered as plain values and compared.
Nothing connects anywhere.
"""

import json
from contextlib import ExitStack
from io import StringIO
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import pytest
from pyinfra.api.command import FileUploadCommand, FunctionCommand, StringCommand
from pyinfra.context import ctx_host, ctx_state

from operations import common

ROOT = Path(__file__).resolve().parent.parent
# Facts whose real values are not JSON types.
CONVERT = {"deb.DebPackages": lambda v: {k: set(vs) for k, vs in v.items()}}


class FakeData(dict):
    pass


class FailCommand(StringCommand):
    """What operations.common.fail returns, with the message kept for the spec."""

    def __init__(self, message):
        super().__init__(*common.fail(message).bits)
        self.message = message


class FakeHost:
    """Just enough of pyinfra.api.host.Host for the operations under test."""

    def __init__(self, name, facts, state):
        self.name = name
        self.data = FakeData()
        self.state = state
        self.facts = facts
        self.asked = []
        self.noops = []
        self.current_op_global_arguments = {}
        self.in_op = False

    def get_fact(self, cls, *args, **kwargs):
        if args:
            pytest.fail(f"fact {cls.__name__} asked with positional arguments {args}")
        key = fact_key(cls, kwargs)
        self.asked.append(key)
        if key not in self.facts:
            pytest.fail(f"unexpected fact request: {key!r} (the spec's facts: {sorted(self.facts)})")
        value = self.facts[key]
        return CONVERT.get(key.split("(")[0], lambda v: v)(value)

    def noop(self, description):
        self.noops.append(description)

    def log(self, *args, **kwargs):
        pass

    def get_temp_filename(self, hash_key=None, hash_filename=True, *args, **kwargs):
        return "/tmp/pyinfra-spec-temp"


class FakeDataHost:
    """What settings_for reads: a name and a data mapping."""

    def __init__(self, name, data):
        self.name = name
        self.data = data


def fact_key(cls, kwargs) -> str:
    name = f"{cls.__module__.rsplit('.', 1)[-1]}.{cls.__name__}"
    if kwargs:
        name += "(" + ", ".join(f"{k}={v}" for k, v in sorted(kwargs.items())) + ")"
    return name



def render(command):
    if isinstance(command, str):
        return command.strip()  # as pyinfra's operation wrapper does
    if isinstance(command, FailCommand):
        return {"fail": command.message}
    if isinstance(command, StringCommand):
        return command.get_raw_value()
    if isinstance(command, FileUploadCommand):
        src = command.src
        content = src.getvalue() if isinstance(src, StringIO) else Path(src).read_text()
        return {"upload": command.dest, "content": content}
    if isinstance(command, FunctionCommand):
        shown = {"function": command.function.__name__}
        if command.args and isinstance(command.args[0], StringCommand):
            shown["command"] = command.args[0].get_raw_value()  # a command run on the host
        return shown
    return {"unknown": repr(command)}


def matches(expected, actual) -> bool:
    if isinstance(expected, dict) and isinstance(actual, dict):
        # An upload spec may leave its content out.
        return all(actual.get(k) == v for k, v in expected.items())
    return expected == actual



def run_op(op, kwargs: dict, host: str, facts: dict, executing: bool = False,
           fail_in=(), catch: bool = False, fake_class=None, render=render):
    """(rendered commands, fake host, exception or None) of op._inner(**kwargs).

    fail_in: the operation modules whose fail() is replaced by FailCommand (rendered as
    {"fail": message}); catch: an exception the operation raises is returned, not raised.
    """
    config = SimpleNamespace(DIFF=False, TEMP_DIR="/tmp", SUDO=False)
    state = SimpleNamespace(is_executing=executing, config=config, cwd=str(ROOT), inventory=None)
    fake = (fake_class or FakeHost)(host, facts, state)
    commands, error = [], None
    with ExitStack() as stack:
        for module in fail_in:
            stack.enter_context(mock.patch.object(module, "fail", FailCommand))
        stack.enter_context(ctx_state.use(state))
        stack.enter_context(ctx_host.use(fake))
        try:
            for command in op._inner(**kwargs):
                commands.append(render(command))
        except Exception as exc:  # noqa: BLE001 - the spec says which
            if not catch:
                raise
            error = exc
    return commands, fake, error


def check_spec(spec: dict, commands: list, fake, error) -> None:
    """The spec's expectation: "raises" (an exception or a last fail()), "noop" (no
    command and a host.noop, whose text may be given) or the exact "commands"."""
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
