#!/usr/bin/env bash
# Install, offline, the wheels of scripts/fetch_wheels.sh that this Python lacks, then say whether the
# upstream reference code (mini-dust3r) imports, i.e. whether the upstream parity tests will run or skip.
#   bash scripts/install_wheels.sh [DIR]      default DIR: wheels; run inside the environment
# A package already installed is left alone (never upgraded or downgraded): only wheels whose
# distribution is missing are installed, with `pip install --no-index --find-links DIR --no-deps`.
# Exit status: 0 when mini-dust3r imports afterwards, 1 otherwise (the tests then skip with the reason).
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
dir="${1:-wheels}"
if compgen -G "$dir/*.whl" >/dev/null; then
    mapfile -t missing < <(python - "$dir" <<'EOF'
import importlib.metadata
import pathlib
import sys

for wheel in sorted(pathlib.Path(sys.argv[1]).glob("*.whl")):
    try:
        importlib.metadata.distribution(wheel.name.split("-")[0])
    except importlib.metadata.PackageNotFoundError:
        print(wheel)
EOF
)
    if [ "${#missing[@]}" -gt 0 ]; then
        echo "installing from $dir/: ${missing[*]##*/}"
        python -m pip install --quiet --disable-pip-version-check --no-index --find-links "$dir" --no-deps \
            --no-compile "${missing[@]}" || echo "pip could not install the wheels above (see its error)"
    else
        echo "every package in $dir/ is already installed"
    fi
else
    echo "no wheels in $dir/: nothing installed. Upstream parity tests need mini-dust3r; without network, fill" \
         "$dir/ on a machine with network access (bash scripts/fetch_wheels.sh) and bring it along"
fi
PYTHONPATH="tests${PYTHONPATH:+:$PYTHONPATH}" python - <<'EOF'
import sys

from upstream import load_upstream

try:
    with load_upstream():
        pass
except BaseException as exc:  # pytest.skip raises Skipped, a BaseException
    print(f"upstream reference code: NOT importable, upstream parity tests will skip: {exc}")
    sys.exit(1)
print("upstream reference code: importable, upstream parity tests will run")
EOF
