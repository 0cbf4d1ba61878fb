#!/usr/bin/env bash
# Check freqtag on a real GPU in one command (issue #13): bench/gpu_check.py's nine stages,
# figures in OUT/gpu_check.json (--cpu: OUT/gpu_check_cpu.json), a summary table, exit 1 on any failure.
#
#   bench/gpu_check.sh [--cpu] [--wheels DIR] [--out DIR] [gpu_check.py options]
#
#   --cpu         tiny sizes, every stage on the CPU (under a minute on 2 cores; no GPU needed)
#   --wheels DIR  first install the project from this checkout into a fresh venv, offline, from the
#                 wheels in DIR (made on a machine with network: see bench/README.md, "gpu_check")
#   --out DIR     where the JSON goes (default: bench/results/)
#   other options go to bench/gpu_check.py (python bench/gpu_check.py --help lists them)
# Without --wheels it runs with ${PYTHON:-python3}, which must have the project installed.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-python3}"
wheels=""
args=()
while (($#)); do
    case "$1" in
        --wheels) wheels="${2:?--wheels needs a folder}"; shift 2 ;;
        --wheels=*) wheels="${1#*=}"; shift ;;
        -h|--help) sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) args+=("$1"); shift ;;
    esac
done

if [[ -n "$wheels" ]]; then
    [[ -d "$wheels" ]] || { echo "gpu_check.sh: --wheels $wheels: no such folder" >&2; exit 2; }
    wheels="$(cd "$wheels" && pwd)"
    # a fresh venv outside the checkout and outside --out (it would travel back with the figures)
    venv="${TMPDIR:-/tmp}/freqtag-gpu-check-venv"
    rm -rf "$venv"
    "$python" -m venv "$venv"
    "$venv/bin/python" -m pip install --quiet --no-index --find-links "$wheels" -e "$repo[test]"
    python="$venv/bin/python"
fi

exec "$python" "$repo/bench/gpu_check.py" ${args[@]+"${args[@]}"}
