"""The Python environment on each host: a conda env (Miniforge/Miniconda) or a venv, torch
built for the resolved CUDA, the pinned ChatGLM requirements, and a check that it imports.

The plan (which Python, which torch, which lock) comes from operations/pyplan.py; these
operations compare it with facts read from the host and change only what differs, so a
changed pin is applied on the next run and a second run changes nothing.
"""

import hashlib
import json
import shlex
from io import StringIO

from pyinfra import host, logger
from pyinfra.api import FileUploadCommand, StringCommand, operation
from pyinfra.api.command import QuoteString
from pyinfra.facts.files import File
from pyinfra.operations import files

from facts.pyenv import (SITE_PTH, CondaInstall, EnvFingerprint, EnvPython, Interpreter, PipFreeze,
                         PythonStack, SystemSitePth)

from .common import fail, render
from .pyplan import PythonPlan
from .resolver import runs_on_arch_list, version_tuple
from .settings import VERIFIED

PIP = ("-m", "pip", "install", "--no-input", "--progress-bar", "off", "--disable-pip-version-check")

@operation()
def conda(install_dir: str, prefix: str, url: str, sha256: str, file: str, channels: list[str],
          mirror: str = ""):
    """
    Install Miniforge or Miniconda unattended, checked against its sha256, and its .condarc.

    + install_dir: the deploy's directory on the host
    + prefix: where conda goes
    + url: the installer's URL
    + sha256: the installer's pinned sha256
    + file: where the installer is downloaded (removed once installed)
    + channels: the channels .condarc lists
    + mirror: a conda mirror default and custom channels map onto ('' for none)

    The installer runs only when the prefix holds no conda; a prefix that exists without
    bin/conda fails the host instead of being overwritten. .condarc lists the channels and,
    when conda_mirror is set, maps default and custom channels onto the mirror.
    """
    yield from files.directory._inner(path=install_dir, mode="755")
    found = host.get_fact(CondaInstall, prefix=prefix)
    if found["state"] == "partial":
        yield fail(f"{prefix} exists but holds no bin/conda (an interrupted install?); "
                   f"Fix: remove {prefix}, or set conda_dir to another directory")
        return
    if found["state"] == "absent":
        # A file whose sha256 differs fails the host; the rerun fetches it again. pyinfra's
        # check, the download's last command, only says "SHA256 did not match!": ours follows it
        # with the settings that chose the file and the fix.
        commands = list(files.download._inner(src=url, dest=file, sha256sum=sha256,
                                              extra_curl_args={"--retry": "3"}))
        if commands:
            yield from commands[:-1]
            yield StringCommand(commands[-1], "||", "{", "echo", QuoteString(
                f"ERROR: the conda installer from {url} does not have the sha256 {sha256}. Fix: set "
                "conda_installer_sha256 to the sha256 published beside that file, or point "
                "conda_installer_url (or conda_mirror) at the file this sha256 belongs to"),
                ">&2;", "exit", "1;", "}")
        yield StringCommand("bash", QuoteString(file), "-b", "-p", QuoteString(prefix))
        yield StringCommand("rm", "-f", QuoteString(file))
    else:
        host.noop(f"conda {found['version']} in {prefix}")
    yield from files.put._inner(
        src=StringIO(render("condarc.j2", prefix=prefix, channels=channels, mirror=mirror)),
        dest=f"{prefix}/.condarc", mode="644")


@operation()
def env(py: PythonPlan):
    """
    Create the conda env or the venv with the planned Python; recreate it when that changed.

    + py: the host's Python plan (operations.pyplan.PythonPlan): backend, env, python_version (conda), interpreter and
      system_site_packages (venv), pythons (the versions the lock and torch support), index

    A venv is made by the host's interpreter, which must be a Python the lock has wheels
    for, else the host fails with the fix. Writes <env>/pip.conf when pip_index_url is
    set (pip in the env then uses the mirror), removes it when not.
    """
    target = py.env
    have = host.get_fact(EnvPython, env=target)
    if py.backend == "conda":
        conda_bin = QuoteString(f"{py.conda.prefix}/bin/conda")
        if have is not None and have["version"] != py.python_version:
            yield StringCommand(conda_bin, "remove", "-y", "-q", "--all", "-p", QuoteString(target))
            have = None
        if have is None:
            yield StringCommand(conda_bin, "create", "-y", "-q", "-p", QuoteString(target),
                                f"python={py.python_version}", "pip")
        else:
            host.noop(f"conda env {target} has Python {have['version']}")
    else:
        interpreter = host.get_fact(Interpreter, python=py.interpreter)
        if interpreter is None:
            yield fail(f"no interpreter {py.interpreter!r} on the host to create the venv; "
                       "Fix: install it (python3 and python3-venv), set python to one that "
                       "exists, or use python_backend='conda'")
            return
        if py.pythons and interpreter not in py.pythons:
            newest = max(py.pythons, key=version_tuple)
            fixes = [f"set python to a Python {newest} interpreter"]
            if py.torch:
                fixes.append(f"use python_backend='conda' (it brings Python {newest})")
            if interpreter == "3.12" and py.lock_name != "chatglm-py312-system-torch":
                fixes.append("with the system's own torch: requirements='chatglm-py312-system-torch' "
                             "and venv_system_site_packages=True")
            why = (" (ChatGLM-6B needs transformers <= 4.33, whose tokenizers 0.13 has no wheels "
                   "past 3.11)" if "3.12" not in py.pythons else "")
            yield fail(f"{py.interpreter} is Python {interpreter}, but the lock "
                       f"{py.lock_name!r} has wheels for Python {', '.join(py.pythons)} "
                       f"only{why}; Fix: {', or '.join(fixes)}")
            return
        flags = ["--system-site-packages"] if py.system_site_packages else []
        if have is not None and (have["version"] != interpreter or not have["venv"]):
            yield StringCommand("rm", "-rf", QuoteString(target))
            have = None
        if have is None:
            yield StringCommand(py.interpreter, "-m", "venv", *flags, QuoteString(target))
        elif have["system_site_packages"] != py.system_site_packages:
            # --upgrade rewrites pyvenv.cfg (the flag) and keeps the installed packages.
            yield StringCommand(py.interpreter, "-m", "venv", "--upgrade", *flags,
                                QuoteString(target))
        else:
            host.noop(f"venv {target} has Python {have['version']}"
                      f"{' with the system site-packages' if have['system_site_packages'] else ''}")
        if py.system_site_packages and not host.get_fact(SystemSitePth, env=target,
                                                            python=py.interpreter):
            # The H100 image's python3 is itself a venv (/opt/torch/.venv): its torch lives
            # in that venv's site-packages, which --system-site-packages does not reach.
            yield StringCommand("sh", "-c", QuoteString(
                SITE_PTH.format(env=shlex.quote(target), python=shlex.quote(py.interpreter))
                + 'printf "%s\\n" "$want" > "$pth"'))
    if py.index:
        yield from files.put._inner(
            src=StringIO(render("pip.conf.j2", env=target, index=py.index, trusted_host=py.trusted_host)),
            dest=f"{target}/pip.conf", mode="644")
    else:
        yield from files.file._inner(path=f"{target}/pip.conf", present=False)


@operation()
def packages(py: PythonPlan):
    """
    Install torch for the planned build and every pin of the lock file into the env.

    + py: the host's Python plan (operations.pyplan.PythonPlan): python, torch ("2.5.1+cu121", None for the system's),
      torch_index, torch_deps, lock_text, pins, index

    torch comes from its own index (the PyTorch wheel index of the resolved CUDA, or a
    mirror); a CUDA build brings its nvidia-* wheels from there. The rest of the lock is
    installed with --no-deps, so nothing beyond the lock is resolved. Only what differs
    from the pins is installed: a changed pin is applied on the next run.
    """
    lock_file = f"{py.install_dir}/requirements.lock"
    # A run killed inside pip leaves packages half-written but listed as installed; the mark
    # says so to the next run, which reinstalls every package. pip runs under flock, so a
    # pip still running from a killed run finishes before the next one starts.
    unfinished = f"{py.install_dir}/.chatglm-pip-unfinished"
    pip_lock = f"{py.install_dir}/.chatglm-pip.lock"
    yield from files.directory._inner(path=py.install_dir, mode="755")
    yield from files.put._inner(src=StringIO(py.lock_text), dest=lock_file, mode="644")
    installed = host.get_fact(PipFreeze, venv=py.env) or {}
    interrupted = bool(host.get_fact(File, path=unfinished))
    force = ["--force-reinstall"] if interrupted else []
    pip = ("flock", QuoteString(pip_lock), QuoteString(py.python), *PIP, *force)
    index = ["--index-url", QuoteString(py.index)] if py.index else []
    commands = []
    if py.torch and (interrupted or installed.get("torch") != py.torch):
        extra = (["--extra-index-url", QuoteString(py.index)]
                 if py.index and py.index != py.torch_index else [])
        commands.append(StringCommand(*pip, *([] if py.torch_deps else ["--no-deps"]),
                                      "--index-url", QuoteString(py.torch_index), *extra,
                                      f"torch=={py.torch}"))
    drift = sorted(name for name, version in py.pins.items()
                   if installed.get(name, "").split("+")[0] != version.split("+")[0])
    if drift or interrupted:
        # --no-deps: the lock is complete, so pip must not resolve anything beyond it.
        commands.append(StringCommand(*pip, "--no-deps", *index, "-r", QuoteString(lock_file)))
    if not commands:
        torch = f"torch {py.torch}, " if py.torch else "the system's torch, "
        host.noop(f"{py.env} has {torch}and the {len(py.pins)} pins of {py.lock_name}")
        return
    if interrupted:
        logger.warning(f"[{host.name}] {py.env}: an earlier pip install was cut off: "
                       "every package is reinstalled")
    yield StringCommand("touch", QuoteString(unfinished))
    yield from commands
    yield StringCommand("rm", "-f", QuoteString(unfinished))


def _cuda_ok(have: str | None, expect: str | None, installed_by_us: bool) -> bool:
    if expect is None or have is None:
        return have == expect if installed_by_us else expect is None
    if installed_by_us:
        return version_tuple(have)[:2] == version_tuple(expect)[:2]
    # The system's torch: same CUDA major, not newer than the toolkit and driver planned.
    return version_tuple(have)[0] == version_tuple(expect)[0] and version_tuple(have) <= version_tuple(expect)


def verify_key(py: PythonPlan, fingerprint: str) -> str:
    """What pyenv.verify records once the environment passed: the environment's fingerprint
    and everything of the plan the check compared, hashed."""
    plan = [py.env, py.torch, py.expect_cuda, py.gpu, py.gpu_caps,
            py.pins.get("transformers"),
            hashlib.sha256(py.lock_text.encode()).hexdigest(), fingerprint]
    return hashlib.sha256(json.dumps(plan).encode()).hexdigest()[:32]


@operation()
def verify(py: PythonPlan):
    """
    Import torch, transformers and cpm_kernels in the env; fail the host on a mismatch.

    + py: the host's Python plan (operations.pyplan.PythonPlan): torch (the version expected, None: the system's), expect_cuda
      (the CUDA torch must be built for, None on CPU hosts), gpu (CUDA must be available),
      pins (transformers), env, lock_text

    A passing check is recorded in <env>/.chatglm-verified with the environment's
    fingerprint (its interpreter, every sys.path entry's names and mtime, the loaded NVIDIA
    module) and the plan; while both are unchanged the imports (seconds) are not repeated.
    Any install, removal or upgrade in the environment, or a changed plan, checks again.
    """
    if not host.state.is_executing:
        host.noop("checked after the install, at execution")
        return
    seen = host.get_fact(EnvFingerprint, venv=py.env)
    if seen["fingerprint"] and seen["stamp"]:
        try:
            last = json.loads(seen["stamp"])
        except ValueError:
            last = {}
        if last.get("key") == verify_key(py, seen["fingerprint"]):
            host.noop(f"torch {last.get('torch')} (CUDA {last.get('cuda')}), transformers "
                      f"{last.get('transformers')}: as planned, environment unchanged since its check")
            return
    stack = host.get_fact(PythonStack, venv=py.env)
    if "error" in stack:
        yield fail(f"{py.env} cannot import torch/transformers/cpm_kernels: {stack['error'].strip()}")
        return
    want_torch = py.torch
    if want_torch and stack["torch"] != want_torch:
        yield fail(f"{py.env} imports torch {stack['torch']}, not the planned {want_torch}; "
                   "Fix: check torch_index_url serves that build, and rerun")
        return
    if not _cuda_ok(stack["cuda"], py.expect_cuda, bool(want_torch)):
        expected = f"CUDA {py.expect_cuda}" if py.expect_cuda else "a CPU build"
        yield fail(f"torch {stack['torch']} is built for "
                   f"{'CUDA ' + stack['cuda'] if stack['cuda'] else 'CPU only'}, but the resolver "
                   f"planned {expected} ({py.torch_tag}); Fix: install the {py.torch_tag} build "
                   "(torch_index_url) or pin cuda_version to the CUDA this torch was built for")
        return
    if stack["cuda_available"] != py.gpu:
        yield fail(
            f"torch {stack['torch']} reports cuda_available={stack['cuda_available']} but the "
            f"resolver planned {'a CUDA' if py.gpu else 'a CPU'} host; check the driver "
            "(nvidia-smi) and the torch wheel index")
        return
    misfit = [cap for cap in py.gpu_caps if not runs_on_arch_list(stack.get("archs"), cap)]
    if misfit:
        yield fail(f"torch {stack['torch']} carries kernels for {', '.join(stack['archs'])}, "
                   f"none of which runs on this host's GPU of compute capability {misfit[0]}; "
                   "Fix: leave cuda_version and torch_version unset (the resolver picks a build "
                   "that carries it) or pin a torch build whose torch.cuda.get_arch_list() has it")
        return
    want_tf = py.pins.get("transformers")
    if want_tf and stack["transformers"] != want_tf:
        yield fail(f"{py.env} imports transformers {stack['transformers']}, not the pinned "
                   f"{want_tf} (a package outside the env shadows it?)")
        return
    # The fingerprint taken after the imports: an import may add __pycache__ directories.
    fingerprint = stack.get("fingerprint") or seen["fingerprint"]
    record = {"key": verify_key(py, fingerprint), "torch": stack["torch"], "cuda": stack["cuda"],
              "transformers": stack["transformers"]}
    yield FileUploadCommand(StringIO(json.dumps(record) + "\n"), f"{py.env}/{VERIFIED}")
