"""Small pieces shared by the stages."""

import os
import shlex
import socket
import sys
import types

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


def register_deploy_file(filename: str) -> None:
    """Make the deploy file known to inspect as a module's file.

    pyinfra orders operations by walking the call stack (inspect.stack) at every operation
    call. inspect looks each frame's file up among the loaded modules, and for a file that
    is no module (deploy.py, which pyinfra runs with exec) it rescans all of sys.modules
    every time: ~17 ms per host of this deploy's collection, measured on 16 hosts. A module
    entry naming the file ends the rescans; nothing imports it.
    """
    name = "_chatglm_deploy_file"
    if name not in sys.modules:
        module = types.ModuleType(name, "stands for deploy.py in inspect's file -> module map")
        module.__file__ = os.path.abspath(filename)
        sys.modules[name] = module
