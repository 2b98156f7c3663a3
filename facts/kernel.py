"""What the kernel stages read: the CPU kernel's source and build stamp, and the lines of
quantization.py the patch touches.
"""

import shlex

from pyinfra.api import FactBase


CALL = "load_cpu_kernel(**kwargs)"
MARK = "# chatglm-deploy: prebuilt CPU kernel"
STAMP = ".chatglm-kernel.sha256"


class KernelState(FactBase):
    """sha256 of a kernel source, and the source sha256 the built .so was made from."""

    batch_inline = True  # see operations.factcache._fact_command

    def command(self, source, built):
        source, stamp, built = (shlex.quote(source), shlex.quote(f"{built}.{STAMP.lstrip('.')}"),
                                shlex.quote(built))
        return (f"src=$(sha256sum {source} 2>/dev/null); src=${{src%% *}}; "
                f"so=; [ -f {built} ] && {{ read -r so < {stamp}; }} 2>/dev/null; "
                "echo \"${src:--} ${so:--}\"")

    @staticmethod
    def default():
        return {"source": "", "built": ""}

    def process(self, output):
        source, built = output[0].split()
        return {"source": source.strip("-"), "built": built.strip("-")}



class PatchLines(FactBase):
    """The lines of a file that the patch reads or writes (the load_cpu_kernel call and
    our mark), as [(line number, text)]; None when the file does not exist. Lets a run
    see that quantization.py is patched without fetching the whole file."""

    batch_inline = True  # see operations.factcache._fact_command

    def command(self, path):
        path = shlex.quote(path)
        return (f"if [ -f {path} ]; then "
                f"grep -nF -e {shlex.quote(CALL)} -e {shlex.quote(MARK)} {path}; true; "
                "else echo __MISSING__; fi")

    @staticmethod
    def default():
        return None

    def process(self, output):
        if output == ["__MISSING__"]:
            return None
        lines = []
        for line in output:
            number, _, text = line.partition(":")
            lines.append((int(number), text))
        return lines
