#!/usr/bin/env bash
# Measure every figure of the README's recipe table again, one run after another, each row appended to
# benchmarks/RESULTS.md with its machine, date and commit:
#
#   bash benchmarks/readme_table.sh [CIFAR10_FOLDER]     # default data/cifar10-jpeg, as in the README
#
# About 35 minutes on 2 Sapphire Rapids cores with AMX, and 35 more for cifar10-long, which runs last; several
# times longer on CPUs without AMX. MNIST and Fashion-MNIST come from IMGCLF_DATA (default ~/.cache/imgclf),
# downloaded if missing. DRY_RUN=1 prints the commands only. PYTHON names the interpreter (default .venv's).
set -euo pipefail
given=${1:-}
cd "$(dirname "$0")/.."
python=${PYTHON:-.venv/bin/python}
cifar10=data/cifar10-jpeg
[ -z "$given" ] || cifar10=$(cd "$OLDPWD" && realpath -m -- "$given")  # a relative folder is the caller's

grep -qs amx_bf16 /proc/cpuinfo \
    || echo "note: this CPU has no AMX; the README's times were measured on 2 Sapphire Rapids cores with it"
run() {
    echo "+ python benchmarks/time_to_accuracy.py $*"
    [ -n "${DRY_RUN:-}" ] || "$python" benchmarks/time_to_accuracy.py "$@"
}

run --recipe mnist-fast --runs 3
run --recipe fashion-fast --runs 3
run --throughput --models fastnet --shape 32x32x3
if [ -d "$cifar10" ]; then
    # The JPEG copy has no test split: its rows are on a 10% validation split (issue 3).
    run --recipe cifar10-fast --dataset "$cifar10" --val-split 0.1 --runs 3
    run --recipe cifar10-long --dataset "$cifar10" --val-split 0.1 --runs 1
else
    echo "skipped the CIFAR-10 rows: no folder $cifar10; give the CIFAR-10 image folder (train/<class>/*.jpg)"
fi
