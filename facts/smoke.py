"""What the smoke stage reads: the model's files (hashed) and the smoke test's files."""

import base64
import shlex

from pyinfra.api import FactBase


class ModelFiles(FactBase):
    """Name, size and mtime of every file at the top of a model checkout, hashed: changes
    when a file of the model is replaced or edited on the host; '' when there is none."""

    def command(self, path):
        return (f"cd {shlex.quote(path)} 2>/dev/null && find . -maxdepth 1 -type f -printf '%P %s %T@\\n' "
                "| LC_ALL=C sort | sha256sum | cut -c1-16 || true")

    @staticmethod
    def default():
        return ""

    def process(self, output):
        return output[0].strip() if output else ""


class SmokeState(FactBase):
    """All the smoke test's no-op check needs, in one command: {"model_files": ModelFiles'
    hash of the checkout, "dir": mode of the smoke directory ('' if absent), "script":
    "<sha1> <mode>" of the uploaded script ('' if absent), "result": result.json's text
    (None if absent)}."""

    batch_inline = True  # see operations.factcache._fact_command

    def command(self, path, smoke_dir):
        d = shlex.quote(smoke_dir)
        return (f"echo \"model $({ModelFiles().command(path)})\"; "
                f"echo \"dir $(stat -c %a {d} 2>/dev/null)\"; "
                f"echo \"script $(sha1sum {d}/smoke_test.py 2>/dev/null | cut -d' ' -f1) "
                f"$(stat -c %a {d}/smoke_test.py 2>/dev/null)\"; "
                f"[ -f {d}/result.json ] && base64 -w0 {d}/result.json && echo || echo __MISSING__")

    @staticmethod
    def default():
        return {"model_files": "", "dir": "", "script": "", "result": None}

    def process(self, output):
        values = {line.split(" ", 1)[0]: line.split(" ", 1)[1].strip() if " " in line else ""
                  for line in output[:3]}
        result = "".join(output[3:])
        return {"model_files": values["model"], "dir": values["dir"], "script": values["script"],
                "result": None if result == "__MISSING__" else base64.b64decode(result).decode()}
