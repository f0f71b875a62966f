#!/usr/bin/env bash
# Fresh-machine test run: venv, CPU torch, dependencies, the whole suite.
# `.ci/run` runs exactly this. torch is pinned here for the test machine only (a CPU wheel
# of 2.13.0 is what these machines carry); the pack itself never pins torch.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --disable-pip-version-check torch==2.13.0
python -m pip install -q --disable-pip-version-check -r requirements.txt -r requirements-dev.txt
set +e
python -m pytest -q -p no:cacheprovider "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then  # pytest: no tests collected
  echo "no tests were collected"; rc=0
fi
exit "$rc"
