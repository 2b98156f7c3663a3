"""Small pieces shared by the stages."""

import shlex
import socket

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
