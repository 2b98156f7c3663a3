"""The project's facts: what each stage reads from a host, one module per stage, beside
operations/ the way pyinfra keeps pyinfra/facts beside pyinfra/operations.

A converged host runs them all in one command (operations/factcache.py); a fact marked
`batch_inline = True` runs in that command's own shell, so its command sets every variable
it reads and neither exits, changes directory nor sets shell options.
"""

import functools
from pathlib import Path


@functools.cache
def script(name: str) -> str:
    """A fact's longer shell, from facts/sh/<name>.sh, without its comment lines (they would
    travel to every host at every run)."""
    text = (Path(__file__).parent / "sh" / f"{name}.sh").read_text()
    return "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
