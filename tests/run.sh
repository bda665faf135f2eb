#!/usr/bin/env bash
# Installs everything the test suite needs on a fresh machine (system packages when root, a .venv with the
# package and its test extras), checks the code with ruff and mypy, and runs the suite. Extra arguments go to pytest
# (`bash tests/run.sh -m unit`: the fast tier alone).
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  need=()
  [ -x /usr/sbin/sshd ] || need+=(openssh-server)
  command -v ssh >/dev/null || need+=(openssh-client)
  command -v ip >/dev/null || need+=(iproute2)
  command -v unshare >/dev/null || need+=(util-linux)
  [ -x /usr/bin/chromium ] || need+=(chromium)  # the panel's browser test (Playwright drives it)
  if [ ${#need[@]} -gt 0 ]; then
    echo "installing system packages: ${need[*]}"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
  fi
fi

[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q -e '.[test]'
# Lint and type-check first: either failing fails the run (set -e).
.venv/bin/python -m ruff check sky_jupyter tests bench
.venv/bin/python -m mypy sky_jupyter
# Two processes (pytest-xdist), each module whole on one of them with its own fixtures (sshd cluster slot, Hub,
# moto, sky home): the suite waits on processes and sockets as much as on the CPU. SKY_TEST_PROCESSES=0 runs in this
# process; later arguments win (e.g. `bash tests/run.sh -n 0 -k name`).
exec .venv/bin/python -m pytest -q -n "${SKY_TEST_PROCESSES:-2}" --dist loadfile "$@"
