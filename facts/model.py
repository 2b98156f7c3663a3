"""What the model stage reads: the commit a checkout is at, its LFS pointers and which
weight files are verified, and a remote's refs.
"""

import shlex

from pyinfra.api import FactBase

from facts import script
from operations.settings import VERIFIED


def _read_head(git_dir: str) -> str:
    """Shell that sets $head to what <git_dir>/HEAD holds ('' when unreadable); `case
    $head in {NOT_A_COMMIT})` then tells a detached commit (what clone leaves) from a branch."""
    return f"head=; {{ read -r head < {shlex.quote(git_dir + '/HEAD')}; }} 2>/dev/null; "


NOT_A_COMMIT = "''|*[!0-9a-f]*"


class GitHead(FactBase):
    """The commit checked out in a repo, or '' when it is not a git checkout."""

    batch_inline = True  # see operations.factcache._fact_command

    def command(self, path):
        # A detached HEAD (what clone leaves) is read by the shell itself; git only for a
        # branch or anything else.
        return (_read_head(f"{path}/.git") + f"case $head in {NOT_A_COMMIT}) "
                f"git -C {shlex.quote(path)} rev-parse HEAD 2>/dev/null || true;; "
                "*) echo $head;; esac")

    @staticmethod
    def default():
        return ""

    def process(self, output):
        return output[0].strip()


class LfsFiles(FactBase):
    """LFS-tracked files of a checkout: {name: {oid, size, actual, verified}}.

    oid/size come from the pointer committed at HEAD; actual is the size of the file
    in the work tree; verified is the oid recorded when a download was checked.
    """

    batch_inline = True  # see operations.factcache._fact_command

    def command(self, path):
        return (f"path={shlex.quote(path)}; stamps={VERIFIED}; " + _read_head(f"{path}/.git")
                + script("lfs_files").replace("@NOT_A_COMMIT@", NOT_A_COMMIT))

    @staticmethod
    def default():
        return {}

    def process(self, output):
        pointers, actual, verified = [], {}, {}
        for line in output:
            kind, _, rest = line.partition(" ")
            if kind == "P":
                oid, size, name = rest.split(" ", 2)
                pointers.append((name, oid, int(size)))
            elif kind == "S":
                size, name = rest.split(" ", 1)
                actual[name] = int(size)
            elif kind == "V":
                stamp, name = rest.split(" ", 1)
                verified[name] = stamp
        return {name: {"oid": oid, "size": size, "actual": actual.get(name, -1),
                       "verified": verified.get(name, "-")} for name, oid, size in pointers}


class PointerIndex(FactBase):
    """The commit a checkout is at and whether LfsFiles' list of its pointers is kept:
    {"head": sha, "indexed": bool}; head is '' when HEAD is not a detached commit."""

    batch_inline = True  # see operations.factcache._fact_command

    def command(self, path):
        return (_read_head(f"{path}/.git") + f"case $head in {NOT_A_COMMIT}) ;; *) "
                f"if [ -f {shlex.quote(f'{path}/{VERIFIED}/.pointers-')}$head ]; then echo $head indexed; "
                "else echo $head; fi;; esac")

    @staticmethod
    def default():
        return {"head": "", "indexed": False}

    def process(self, output):
        words = output[0].split() if output else []
        return {"head": words[0] if words else "", "indexed": len(words) > 1}


class RemoteRefs(FactBase):
    """{ref name: commit} of the refs of a remote matching a branch or tag name ({} when
    git is missing or the remote cannot be reached). Annotated tags come peeled ('^{}')."""

    def command(self, url, ref):
        return (f"command -v git >/dev/null && GIT_TERMINAL_PROMPT=0 git ls-remote "
                f"{shlex.quote(url)} {shlex.quote(ref)} 2>/dev/null || true")

    @staticmethod
    def default():
        return {}

    def process(self, output):
        refs = {}
        for line in output:
            parts = line.split()
            if len(parts) == 2:
                refs[parts[1]] = parts[0]
        return refs
