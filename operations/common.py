"""Small pieces shared by the stages."""

import functools
import shlex
from pathlib import Path

import jinja2
from pyinfra import host
from pyinfra.api import StringCommand
from pyinfra.facts.files import FileContents

TEMPLATES = Path(__file__).resolve().parent.parent / "templates"


def fail(message: str) -> StringCommand:
    """A command that fails this host with message on stderr.

    Raising from an operation at execution aborts the whole run; a failing command
    fails only this host, shows the message, and lets the other hosts finish.
    """
    return StringCommand("sh", "-c", shlex.quote(f"echo {shlex.quote('ERROR: ' + message)} >&2; exit 1"))


def text_of(path: str) -> str | None:
    """A text file on the host as one string (a final newline added), None when it does not
    exist: what the patches of quantization.py read, edit and write back whole."""
    lines = host.get_fact(FileContents, path=path)
    return None if lines is None else "\n".join(lines) + "\n"


@functools.cache
def _templates() -> jinja2.Environment:
    # StrictUndefined: a missing value is an error, not an empty string in a config file.
    # Block tags take their line with them; SVG is escaped, config and code are not.
    return jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATES)),
                              undefined=jinja2.StrictUndefined, keep_trailing_newline=True,
                              trim_blocks=True, lstrip_blocks=True,
                              autoescape=lambda name: (name or "").endswith(".svg.j2"))


def render(template: str, **data) -> str:
    """A templates/ file rendered with data; each template is compiled once per run."""
    return _templates().get_template(template).render(**data)

