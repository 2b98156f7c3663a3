"""Git remotes shaped like the upstream ones, served by `git daemon` on loopback.

Model repos hold their weights as real git-lfs pointer files (sha256 and size of the
fixture weights), as a GIT_LFS_SKIP_SMUDGE=1 clone of Hugging Face yields them.
Each repo gets two commits, the first tagged v1.0 and the second v1.1.0, so a pin
can differ from the branch tip.
"""

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

LFS_PATTERNS = ["*.bin", "*.model"]
GIT_ENV = {
    "GIT_AUTHOR_NAME": "chatglm lab", "GIT_AUTHOR_EMAIL": "lab@localhost",
    "GIT_COMMITTER_NAME": "chatglm lab", "GIT_COMMITTER_EMAIL": "lab@localhost",
    "GIT_CONFIG_GLOBAL": "/dev/null", "GIT_CONFIG_NOSYSTEM": "1",
}


def pointer(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return (f"version https://git-lfs.github.com/spec/v1\noid sha256:{digest.hexdigest()}\n"
            f"size {path.stat().st_size}\n")


def _git(cwd, *args, date="2023-04-20T12:00:00+08:00"):
    env = {**os.environ, **GIT_ENV, "GIT_AUTHOR_DATE": date, "GIT_COMMITTER_DATE": date}
    return subprocess.run(["git", *args], cwd=cwd, env=env, check=True,
                          capture_output=True, text=True).stdout.strip()


def make_repo(bare: Path, files: dict[str, str | Path], lfs: set[str], readme: str) -> str:
    """Create bare repo `bare` from files (name -> text or source path); return HEAD commit."""
    work = bare.with_name(bare.name + ".work")
    shutil.rmtree(work, ignore_errors=True)
    shutil.rmtree(bare, ignore_errors=True)
    work.mkdir(parents=True)
    _git(work, "init", "-q", "-b", "main")
    (work / "README.md").write_text(readme)
    if lfs:
        (work / ".gitattributes").write_text(
            "".join(f"{p} filter=lfs diff=lfs merge=lfs -text\n" for p in LFS_PATTERNS))
    for name, content in files.items():
        target = work / name
        if name in lfs:
            target.write_text(pointer(Path(content)))
        elif isinstance(content, Path):
            shutil.copy(content, target)
        else:
            target.write_text(content)
    _git(work, "add", "-A")
    _git(work, "commit", "-q", "-m", "Initial release")
    _git(work, "tag", "v1.0")
    with open(work / "README.md", "a") as f:
        f.write("\nPin a revision when loading with trust_remote_code.\n")
    _git(work, "commit", "-q", "-am", "README: recommend pinning a revision",
         date="2023-05-10T12:00:00+08:00")
    _git(work, "tag", "v1.1.0")
    head = _git(work, "rev-parse", "HEAD")
    bare.parent.mkdir(parents=True, exist_ok=True)
    _git(work.parent, "clone", "-q", "--bare", str(work), str(bare))
    shutil.rmtree(work)
    return head


def build_remotes(git_root: Path, fixtures: dict, code_dir: Path) -> dict:
    """Create THUDM/ChatGLM-6B and THUDM/chatglm-6b{,-int8,-int4}; return {repo: commit}."""
    commits = {}
    code_files = {p.name: p for p in sorted(code_dir.iterdir()) if p.is_file()}
    commits["ChatGLM-6B"] = make_repo(git_root / "THUDM" / "ChatGLM-6B", code_files, set(),
                                      "# ChatGLM-6B (lab stand-in)\n\nDemo code for the model repos.\n")
    for variant, info in fixtures.items():
        src = Path(info["dir"])
        files = {p.name: p for p in sorted(src.iterdir()) if p.is_file()}
        name = src.name
        commits[name] = make_repo(git_root / "THUDM" / name, files, set(info["weights"]),
                                  f"# {name} (lab fixture)\n\nA tiny ChatGLM-shaped model for tests.\n")
    return commits

