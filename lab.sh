#!/usr/bin/env bash
# Set up a fresh Debian 12 machine for the lab (as root), then run one of:
#   ./lab.sh demo    the deploy against three throwaway local hosts, run twice, with its report
#   ./lab.sh test    the test suite (what CI runs)
#   ./lab.sh up|down|status
set -euo pipefail
cd "$(dirname "$0")"

need_apt=()
for tool in debootstrap:debootstrap gpg:gnupg apt-ftparchive:apt-utils dpkg-scanpackages:dpkg-dev \
            git:git git-lfs:git-lfs gcc:gcc curl:curl socat:socat \
            aria2c:aria2 opentracker:opentracker; do
  command -v "${tool%%:*}" >/dev/null || need_apt+=("${tool##*:}")
done
# The lab's systemd hosts boot with systemd-nspawn: the one of the installed systemd's version,
# so that installing it does not upgrade systemd itself.
if ! command -v systemd-nspawn >/dev/null; then
  need_apt+=("systemd-container=$(dpkg-query -W -f '${Version}' systemd)")
fi
if ((${#need_apt[@]})); then
  echo "lab.sh: installing ${need_apt[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi

if [ ! -x .venv/bin/pyinfra ] || ! cmp -s <(cat requirements.txt requirements-lab.txt) .venv/.installed 2>/dev/null; then
  echo "lab.sh: installing the control-side Python packages into .venv"
  python3 -m venv .venv
  .venv/bin/pip install -q --disable-pip-version-check -r requirements.txt -r requirements-lab.txt
  cat requirements.txt requirements-lab.txt > .venv/.installed
fi

cmd="${1:-demo}"; shift || true
case "$cmd" in
  test) exec .venv/bin/python -m pytest "$@" ;;
  demo|up|down|status) exec .venv/bin/python -m lab "$cmd" "$@" ;;
  *) echo "usage: ./lab.sh demo|test|up|down|status" >&2; exit 2 ;;
esac
