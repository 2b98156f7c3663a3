"""Read a host's facts in one SSH command instead of one command per fact.

pyinfra reads each fact with its own command, in sequence, and the operations of one stage
wait for every host before the next stage starts: a no-op rerun of this deploy is ~25 round
trips per host, most of its time. This module makes it one:

- every fact read on a host (by our operations and by pyinfra's own, e.g. files.put) is
  recorded, and the list is kept on the control machine
  (<weights_cache>/fact-plans/<host>.json) when the host disconnects;
- on the next run, `prefetch` runs all the listed fact commands in one command at the start
  of the host's collection, and keeps their output;
- a fact read is served from that output while the host is as it was when it was read:
  until the first command of this run executes on the host (a command yielded by any
  operation, including the one reading the fact). After that, and for any fact not in the
  list, or whose command failed or was missing, or that has preconditions or a shell of
  its own, the fact is read live exactly as pyinfra does; a fact read live twice before
  any change is read once.

So a host where nothing changes costs one fact command; a host where something changes
reads the facts after the change live. The list is only a hint: a stale or missing list
costs speed, never correctness. `batch_facts=False` in the inventory turns it off.
"""

import copy
import hashlib
import importlib
import json
import os
import secrets
import tempfile
from pathlib import Path

import pyinfra.api.host as pyinfra_host
from pyinfra.api import BaseStateCallback, FactBase, StringCommand
from pyinfra.api.facts import _MISSING_COMMAND_MARKER as MISSING_COMMAND_MARKER
from pyinfra.api.facts import ShortFactBase

from . import runstate

_read_live = pyinfra_host.get_fact
_IMPORTABLE = ("facts.", "operations.", "pyinfra.facts.")


def batch_command(commands: list, nonce: str, prelude: str = "") -> StringCommand:
    """Many fact commands in one shell, one after another: each after a marker line of a
    per-run nonce (so a fact's own output cannot be mistaken for a boundary), its exit
    status after it. `_split` cuts the output back into (status, stdout lines) per command.
    commands: (command, inline) pairs; an inline command runs in the batch's own shell,
    any other in a subshell of its own (a cd, an exit or a set stays in there).
    The output is sent in one piece at the end: as each command wrote it, it took dozens
    of SSH packets, each encrypted by the host and decrypted by the control machine.
    prelude: shell run first, its output printed before the facts' (the deploy lock)."""
    bits = [prelude + ";"] if prelude else []
    bits += ["out=$("]
    for i, (command, inline) in enumerate(commands):
        bits += ["echo", f"{nonce}-{i};", "{" if inline else "(", command,
                 "\n}" if inline else "\n)", "</dev/null", "2>/dev/null;",
                 "echo", f"{nonce}-rc", "$?;"]
    return StringCommand(*bits, "true);", "printf", "'%s\\n'", '"$out"')


class Batch(FactBase):
    """The raw output of the commands `prefetch` queued under nonce (passed by reference,
    so pyinfra's log line names the count, not every command)."""

    queued: dict = {}

    def command(self, facts, nonce):
        prelude, commands = self.queued[nonce]
        return batch_command(commands, nonce, prelude)

    @staticmethod
    def default():
        return []

    def process(self, output):
        return list(output)


def _key(cls, kwargs) -> str | None:
    try:
        return json.dumps([cls.__module__, cls.__qualname__, kwargs], sort_keys=True)
    except (TypeError, ValueError):
        return None


def _fact_class(module: str, name: str):
    if not module.startswith(_IMPORTABLE):
        return None
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return None
    return cls if isinstance(cls, type) and issubclass(cls, FactBase) else None


def _call(attribute, kwargs):
    return attribute(**kwargs) if callable(attribute) else attribute


def _batchable(cls) -> bool:
    """Facts pyinfra reads in a way of its own (another shell, preconditions, derived from
    another fact) are left to pyinfra."""
    if not (isinstance(cls, type) and issubclass(cls, FactBase)) or issubclass(cls, ShortFactBase):
        return False
    return not (cls is Batch or cls.shell_executable
                or cls.check_preconditions is not FactBase.check_preconditions)


def _fact_command(cls, kwargs) -> tuple:
    """(command, inline): the fact's command as pyinfra runs it, behind `command -v` of the
    command it requires, printing pyinfra's marker when that is missing (then the read is
    left to pyinfra, which reports it its way). inline for a fact class that declares
    `batch_inline = True`: its command sets every variable it reads and neither exits,
    changes directory, sets positional parameters nor shell options, so the fork of a
    subshell (~0.3 ms a fact, a dozen facts a host, every run) can be spared."""
    fact = cls()
    command = _call(fact.command, kwargs)
    required = _call(fact.requires_command, kwargs)
    if not required:
        return command, bool(getattr(cls, "batch_inline", False))
    return StringCommand("if", "command", "-v", required, ">/dev/null", "2>&1;", "then", "(",
                         command, "\n);", "else", "echo", f"'{MISSING_COMMAND_MARKER}';", "fi"), False


def _split(lines: list[str], nonce: str, count: int) -> dict[int, tuple[int, list[str]]]:
    status_mark, start_mark = f"{nonce}-rc ", f"{nonce}-"
    out, current, body = {}, None, []
    for line in lines:
        if line.startswith(status_mark):
            if current is not None:
                out[current] = (int(line.split()[1]), body)
            current, body = None, []
        elif line.startswith(start_mark) and line[len(start_mark):].isdigit():
            current, body = int(line[len(start_mark):]), []
        elif current is not None:
            body.append(line)
    return {i: v for i, v in out.items() if i < count}


class FactCache(BaseStateCallback):
    """Per-run store of prefetched fact output, per host; records what each host read."""

    def __init__(self):
        self.output = {}  # host name -> {key: stdout lines}
        self.read = {}    # host name -> {key: [module, name, kwargs]} in order of first read
        self.plans = {}   # host name -> Path of its fact list
        self.live = {}    # host name -> {key: value} read live while the host was unchanged
        self.dirty = set()
        self.prelude = {}  # host name -> output lines of prefetch's prelude

    # -- reading -------------------------------------------------------------------------

    def get_fact(self, state, host, cls, args=None, kwargs=None, **more):
        kwargs = kwargs or {}
        key = None if (args or more or not _batchable(cls)) else _key(cls, kwargs)
        if key is None or host.name not in self.plans:
            return _read_live(state, host, cls, args=args, kwargs=kwargs, **more)
        self.read.setdefault(host.name, {}).setdefault(
            key, [cls.__module__, cls.__qualname__, kwargs])
        clean = host.name not in self.dirty and not _op_overrides(host)
        lines = self.output.get(host.name, {}).get(key)
        if clean and lines is not None and lines != [MISSING_COMMAND_MARKER]:
            fact = cls()
            try:
                _call(fact.command, kwargs)  # some facts keep their arguments for process()
                return fact.process(lines) if lines else fact.default()
            except Exception:  # pyinfra's own read reports a fact it cannot process
                pass
        read = self.live.setdefault(host.name, {})
        if clean and key in read:
            return copy.deepcopy(read[key])
        value = _read_live(state, host, cls, args=args, kwargs=kwargs)
        if clean and host not in state.failed_hosts:
            read[key] = copy.deepcopy(value)  # the same fact read again before any change
        return value

    def prefetch(self, state, host, plan: Path | None, prelude: str = "") -> int:
        """Run the facts this host read last time in one command; returns how many.

        plan None: no facts are batched (batch_facts=False), only the prelude runs.
        prelude: shell run before the facts in the same command; its output lines (those
        before the facts') are kept in self.prelude[host name]."""
        listed = []
        if plan is not None:
            self.plans[host.name] = plan
            try:
                listed = json.loads(plan.read_text())
            except (OSError, ValueError):
                listed = []
        keys, commands = [], []
        for module, name, kwargs in listed if isinstance(listed, list) else []:
            cls = _fact_class(module, name)
            key = _key(cls, kwargs) if cls is not None and _batchable(cls) else None
            if key is None or key in keys:
                continue
            try:
                command = _fact_command(cls, kwargs)
            except Exception:  # a fact whose signature changed since the list was written
                continue
            keys.append(key)
            commands.append(command)
        if not commands and not prelude:
            return 0
        nonce = f"@@chatglm-fact-{secrets.token_hex(8)}"
        Batch.queued[nonce] = (prelude, commands)
        try:
            lines = _read_live(state, host, Batch, kwargs={"facts": len(commands), "nonce": nonce})
        finally:
            del Batch.queued[nonce]
        first = next((i for i, line in enumerate(lines) if line == f"{nonce}-0"), len(lines))
        self.prelude[host.name] = lines[:first] if prelude else []
        if not commands:
            return 0
        store = self.output.setdefault(host.name, {})
        for i, (status, body) in _split(lines, nonce, len(keys)).items():
            if status == 0:  # a failing fact is read live, so pyinfra reports it as usual
                store[keys[i]] = body
        return len(store)

    # -- change tracking -----------------------------------------------------------------

    def watch(self, state, host) -> None:
        """Mark the host changed as soon as one of its operations yields a command at
        execution, before that command runs (so the yielding operation's later reads
        are live too)."""
        for op_data in state.ops.get(host, {}).values():
            if getattr(op_data.command_generator, "chatglm_watched", False):
                continue
            op_data.command_generator = self._watched(state, host, op_data.command_generator)

    def _watched(self, state, host, generator):
        def watched():
            for command in generator():
                if state.is_executing:
                    self.dirty.add(host.name)
                yield command
        watched.chatglm_watched = True
        return watched

    # -- keeping the list ----------------------------------------------------------------

    def host_disconnect(self, state, host):
        plan, read = self.plans.get(host.name), self.read.get(host.name)
        if plan is None or not read:
            return
        text = json.dumps(list(read.values()), indent=0)
        try:
            if plan.exists() and plan.read_text() == text:
                return
            plan.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=plan.parent, prefix=".plan-")
            with os.fdopen(fd, "w") as f:
                f.write(text)
            os.replace(tmp, plan)
        except OSError:
            pass  # only a hint for the next run


def _op_overrides(host) -> bool:
    """An operation that runs as another user or elsewhere reads its facts that way too."""
    args = host.current_op_global_arguments or {}
    return any(args.get(k) for k in ("_sudo", "_su_user", "_doas", "_chdir", "_env"))


def plan_path(cache_dir: str, host) -> Path:
    """Where the control machine keeps the list of facts this host read: named by the
    inventory name and the address, since labs reuse names."""
    where = f"{host.name}|{host.data.get('ssh_hostname') or host.name}|{host.data.get('ssh_port') or 22}"
    digest = hashlib.sha256(where.encode()).hexdigest()[:16]
    return Path(cache_dir).expanduser() / "fact-plans" / f"{host.name}-{digest}.json"


def install(state) -> FactCache:
    """Route this run's fact reads through one FactCache (once per run)."""
    run = runstate.of(state)
    cache = run.facts
    if cache is None:
        cache = run.facts = FactCache()
        state.add_callback_handler(cache)

        def get_fact(state_, host, cls, args=None, kwargs=None, **more):
            facts = getattr(getattr(state_, "chatglm", None), "facts", None)
            if facts is None:
                return _read_live(state_, host, cls, args=args, kwargs=kwargs, **more)
            return facts.get_fact(state_, host, cls, args=args, kwargs=kwargs, **more)

        pyinfra_host.get_fact = get_fact  # Host.get_fact looks this name up at every call
    return cache
