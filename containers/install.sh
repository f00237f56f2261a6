#!/usr/bin/env bash
# The one install path of cmb-workflow: CI (.ci/run), both Docker images and the Apptainer image
# run this script, so every CI run tests what the containers do.
#
# usage: containers/install.sh [--system-test-deps] [--venv DIR [--extras LIST]]
#   --system-test-deps  apt packages the test suite needs (SLURM, munge, Chromium); CI only,
#                       never in the images
#   --venv DIR          create (or reuse) a virtual environment and install this repository in it
#   --extras LIST       comma-separated extras from setup.cfg, e.g. test or gpu
# PYTHON (default python3) is the interpreter the virtual environment is made from.
# Safe to run again: apt skips installed packages, the venv is reused, pip reinstalls the project.
set -euo pipefail

usage() {
    sed -n '/^# usage:/,/^[^#]/s/^# \{0,1\}//p' "$0" >&2
    exit "$1"
}

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
python=${PYTHON:-python3}
venv=
extras=
test_deps=0
while (($#)); do
    case $1 in
        --system-test-deps) test_deps=1; shift ;;
        --venv) (($# > 1)) || usage 2; venv=$2; shift 2 ;;
        --extras) (($# > 1)) || usage 2; extras=$2; shift 2 ;;
        -h | --help) usage 0 ;;
        *) usage 2 ;;
    esac
done
if [[ -z $venv && $test_deps == 0 ]] || [[ -n $extras && -z $venv ]]; then
    usage 2
fi

apt_install() {
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "$@"
}

if ((test_deps)); then
    apt-get update
    apt_install slurm-wlm munge chromium
fi

if [[ -n $venv ]]; then
    # Debian and Ubuntu ship venv's pip bootstrap as a separate package.
    if ! "$python" -c 'import ensurepip' 2>/dev/null; then
        venv_package=$("$python" -c 'import sys; print("python%d.%d-venv" % sys.version_info[:2])')
        if ((EUID != 0)); then
            echo "install.sh: $python cannot create virtual environments; install $venv_package" >&2
            exit 1
        fi
        apt-get update
        apt_install "$venv_package"
    fi
    "$python" -m venv "$venv"
    "$venv/bin/python" -m pip install "$repo${extras:+[$extras]}"
    "$venv/bin/cmb-workflow" --version
fi
