"""One host's settings, every check of them: what the deploy reads of the inventory."""

from . import pyplan, serve, swarm
from .settings import Settings, read_settings


def settings_for(host) -> Settings:
    """Build and validate one host's settings from its data (host.name, host.data); raise
    SettingError naming the host, the setting and the fix."""
    s = read_settings(host)
    pyplan.check_settings(s)  # backend, lock, mirrors
    serve.check_settings(s)
    swarm.check_settings(s)  # weights_transfer, and this machine's tools for a swarm
    return s
