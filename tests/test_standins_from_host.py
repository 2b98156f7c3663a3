"""Each stand-in checked against its protocol from inside lab host h3, with the
clients a user would use there: apt-get, git, curl."""

import json

from lab.lab import PORTS, SHARES

WWW = f"http://127.0.0.1:{PORTS['www']}"
SEAFILE = f"http://127.0.0.1:{PORTS['seafile']}"


def test_apt_through_the_signed_nvidia_shaped_repo(lab):
    repo = f"{WWW}/compute/cuda/repos/debian12/x86_64"
    lab.ssh("h3", "apt-get install -y -qq curl >/dev/null")
    lab.ssh("h3", f"curl -fsSO {repo}/cuda-keyring_1.1-1_all.deb && dpkg -i cuda-keyring_1.1-1_all.deb")
    sources = lab.ssh("h3", "cat /etc/apt/sources.list.d/cuda-debian12-x86_64.list").stdout
    assert f"signed-by=/usr/share/keyrings/cuda-archive-keyring.gpg] {repo}/ /" in sources
    out = lab.ssh("h3", "apt-get update 2>&1").stdout
    assert "debian12/x86_64  InRelease" in out.replace("/ InRelease", "  InRelease") or "InRelease" in out
    lab.ssh("h3", "DEBIAN_FRONTEND=noninteractive apt-get install -y -qq cuda-drivers-580 "
                  "cuda-toolkit-12-4 >/dev/null 2>&1")
    versions = lab.ssh("h3", "dpkg-query -W -f '${Package} ${Version}\\n' nvidia-driver-580 "
                             "cuda-toolkit-12-4").stdout
    assert "nvidia-driver-580 580." in versions and "cuda-toolkit-12-4 12.4" in versions
    # The driver's library sits where the driver puts it, not in the toolkit.
    lab.ssh("h3", "ls /usr/lib/x86_64-linux-gnu/libcuda.so.580.* /usr/local/cuda-12.4/version.json")
    assert lab.ssh("h3", "ls /usr/local/cuda/lib64/libcuda.so", check=False).returncode != 0
    # No kernel module can load here, and the stand-in says so as the real one would.
    smi = lab.ssh("h3", "nvidia-smi", check=False)
    assert smi.returncode == 9 and "couldn't communicate with the NVIDIA driver" in smi.stdout


def test_tampered_repo_is_refused_by_apt(lab):
    # A second source whose Release is not signed by the keyring must not be trusted.
    lab.ssh("h3", "mkdir -p /srv/fake && cd /srv/fake && : > Packages && "
                  "printf 'Origin: x\\n' > Release")
    out = lab.ssh("h3", "echo 'deb [signed-by=/usr/share/keyrings/cuda-archive-keyring.gpg] "
                        "file:/srv/fake/ /' > /etc/apt/sources.list.d/fake.list; apt-get update 2>&1; "
                        "rm /etc/apt/sources.list.d/fake.list", check=False).stdout
    assert "is not signed" in out or "NO_PUBKEY" in out or "not signed" in out


def test_git_clone_without_smudge_yields_lfs_pointers(lab):
    lab.ssh("h3", "apt-get install -y -qq git git-lfs >/dev/null")
    out = lab.ssh("h3", f"rm -rf /tmp/m && GIT_LFS_SKIP_SMUDGE=1 git clone -q "
                        f"git://127.0.0.1:{PORTS['git']}/THUDM/chatglm-6b-int4 /tmp/m && "
                        "cat /tmp/m/pytorch_model.bin && git -C /tmp/m tag").stdout
    lines = out.splitlines()
    assert lines[0] == "version https://git-lfs.github.com/spec/v1"
    assert lines[1].startswith("oid sha256:") and len(lines[1]) == len("oid sha256:") + 64
    assert lines[2].startswith("size ") and int(lines[2][5:]) > 0
    assert "v1.1.0" in lines


def test_share_listing_redirect_range_and_expiry(lab):
    token = SHARES["quantized"]
    listing = json.loads(lab.ssh(
        "h3", f"curl -fsS '{SEAFILE}/api/v2.1/share-links/{token}/dirents/?path=/chatglm-6b-int4/'").stdout)
    entry = next(d for d in listing["dirent_list"] if d.get("file_name") == "pytorch_model.bin")
    assert entry["file_path"] == "/chatglm-6b-int4/pytorch_model.bin" and not entry["is_dir"]
    headers = lab.ssh("h3", f"curl -sS -o /dev/null -D - "
                            f"'{SEAFILE}/d/{token}/files/?p=/chatglm-6b-int4/pytorch_model.bin&dl=1'").stdout
    assert headers.startswith("HTTP/1.") and " 302" in headers.splitlines()[0]
    location = next(l.split(" ", 1)[1].strip() for l in headers.splitlines()
                    if l.lower().startswith("location:"))
    assert "/seafhttp/files/" in location
    ranged = lab.ssh("h3", f"curl -sS -r 10-19 -D /dev/stderr -o /tmp/part '{location}'; "
                           "stat -c %s /tmp/part")
    assert " 206" in ranged.stderr and ranged.stdout.strip() == "10"
    lab.ssh("h3", f"curl -fsS -X POST {SEAFILE}/_lab/expire")
    expired = lab.ssh("h3", f"curl -sS -o /dev/null -w '%{{http_code}}' '{location}'", check=False)
    assert expired.stdout == "403"
