"""Small pieces shared by the stages."""

import shlex

from pyinfra.api import StringCommand


def fail(message: str) -> StringCommand:
    """A command that fails this host with message on stderr.

    Raising from an operation at execution aborts the whole run; a failing command
    fails only this host, shows the message, and lets the other hosts finish.
    """
    return StringCommand("sh", "-c", shlex.quote(f"echo {shlex.quote('ERROR: ' + message)} >&2; exit 1"))
