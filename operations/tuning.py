"""Speed-ups of pyinfra's own internals, in one place, for the pyinfra they were measured on.

Each one replaces a piece of pyinfra at run time with something that gives pyinfra the same
answers for less work (tests/test_tuning.py compares them with pyinfra's own behaviour):

- ssh_nodelay: TCP_NODELAY on paramiko's sockets (about 40 ms less per command);
- quick_operation_order: operation order from the frames, not from source lines (about
  3 ms per operation and host);
- cached_argument_types: the types of pyinfra's global arguments looked up once per run.

They were written against PYINFRA, the version requirements.txt pins. With another version
apply() leaves them all out and says so: the deploy is then slower, never different.
(operations/factcache.py, which reads a host's facts in one command, is the deploy's own
mechanism and stays on.)
"""

import inspect
import itertools
import socket
import sys

import pyinfra
from pyinfra import logger
from pyinfra.api import BaseStateCallback

PYINFRA = "3.10.0"


def apply(state) -> bool:
    """Apply every speed-up for this run, when pyinfra is the version they were written
    for; else say so once and leave pyinfra as it is. Returns whether they were applied."""
    found = getattr(pyinfra, "__version__", "")
    if found != PYINFRA:
        logger.warning(f"chatglm-deploy: its speed-ups of pyinfra's internals (operations/"
                       f"tuning.py) were written for pyinfra {PYINFRA}, this is pyinfra "
                       f"{found or 'of an unknown version'}: they are left out; the deploy "
                       "runs as it would without them, only slower")
        return False
    ssh_nodelay(state)
    quick_operation_order()
    cached_argument_types()
    return True


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
