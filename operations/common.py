"""Small pieces shared by the stages."""

import inspect
import itertools
import shlex
import socket
import sys

from pyinfra.api import BaseStateCallback, StringCommand


def fail(message: str) -> StringCommand:
    """A command that fails this host with message on stderr.

    Raising from an operation at execution aborts the whole run; a failing command
    fails only this host, shows the message, and lets the other hosts finish.
    """
    return StringCommand("sh", "-c", shlex.quote(f"echo {shlex.quote('ERROR: ' + message)} >&2; exit 1"))


def _nodelay(host) -> None:
    client = getattr(host.connector, "client", None)
    transport = client.get_transport() if client is not None else None
    if transport is not None and isinstance(transport.sock, socket.socket):
        transport.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class _NoDelay(BaseStateCallback):
    @staticmethod
    def host_connect(state, host):
        _nodelay(host)


def ssh_nodelay(state) -> None:
    """Send each SSH packet at once (TCP_NODELAY) on every connection of this run.

    paramiko leaves Nagle's algorithm on, so a command's small request waits for the
    peer's delayed ACK: about 40 ms per command on loopback and on a LAN alike (OpenSSH's
    own client turns it off). A no-op run is dozens of such commands per host. Hosts
    already connected are set now, hosts that connect later (after a reboot) on connect;
    a ProxyCommand connection has no socket of its own and is left as it is.
    """
    for host in state.inventory:
        if host.connected:
            _nodelay(host)
    state.add_callback_handler(_NoDelay())


def _stack(context: int = 1) -> list[tuple]:
    """inspect.stack() as pyinfra uses it ([(frame, ...)], innermost first), without
    reading a line of source per frame."""
    frame, frames = sys._getframe(1), []
    while frame is not None:
        frames.append((frame,))
        frame = frame.f_back
    return frames


_lines: dict[tuple, int] = {}


def _frame_info(frame, context: int = 1) -> inspect.Traceback:
    """inspect.getframeinfo(frame) without source context: the same file name, line (the
    first line of the running instruction's position, as inspect reports it) and function."""
    code = frame.f_code
    line = frame.f_lineno
    if frame.f_lasti >= 0:
        # Positions are walked from the start of the code: the answer is kept per
        # instruction, which every host's pass through deploy.py asks again.
        key = (code, frame.f_lasti)
        found = _lines.get(key)
        if found is None:
            position = next(itertools.islice(code.co_positions(), frame.f_lasti // 2, None), None)
            found = _lines[key] = position[0] if position and position[0] is not None else -1
        if found >= 0:
            line = found
    return inspect.Traceback(code.co_filename, line, code.co_name, None, None)


def quick_operation_order() -> None:
    """Let pyinfra order operations without reading source files.

    At every operation call pyinfra walks the call stack (inspect.stack, then getframeinfo
    per frame) for the line numbers that order the operation. Both read source context
    lines for every frame, and for a file that is no module (deploy.py, run with exec)
    inspect rescans sys.modules each time: ~3 ms per operation and host, most of the
    control machine's CPU in a no-op run. pyinfra uses only each frame's file name and line
    number; these give the same values from the frames themselves. Applied only where
    pyinfra.api.util takes both names from inspect, as the pyinfra this was measured on.
    """
    from pyinfra.api import util

    if getattr(util, "stack", None) is inspect.stack and getattr(util, "getframeinfo", None) is inspect.getframeinfo:
        util.stack, util.getframeinfo = _stack, _frame_info


def cached_argument_types() -> None:
    """Let pyinfra look up the types of its global arguments once per run.

    pyinfra.api.arguments.all_global_arguments evaluates the type hints of its argument
    classes (typing.get_type_hints) at every operation call and every fact read: ~0.4 ms
    each, ~16 times per host in a no-op run. The classes do not change during a run.
    Applied only where the function is pyinfra's own, as in the pyinfra this was measured on.
    """
    from pyinfra.api import arguments, facts

    original = arguments.all_global_arguments
    if getattr(original, "chatglm_cached", False) or original.__module__ != arguments.__name__:
        return
    types = original()

    def all_global_arguments():
        return list(types)

    all_global_arguments.chatglm_cached = True
    arguments.all_global_arguments = all_global_arguments
    if getattr(facts, "all_global_arguments", None) is original:
        facts.all_global_arguments = all_global_arguments
