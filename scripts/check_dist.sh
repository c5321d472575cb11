#!/usr/bin/env bash
# Build the wheel and sdist; install the wheel (no dependencies) into a fresh venv that borrows
# the dependencies of .venv (a .pth file: no 1-GB torch install per CI run), check that they
# satisfy the wheel's requirements, and run the installed `darkmatter
# --help` and `darkmatter info` away from the checkout.
set -euo pipefail
cd "$(dirname "$0")/.."
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
.venv/bin/python -m build --outdir "$work/dist" . >"$work/build.log" 2>&1 || {
  cat "$work/build.log"; exit 1; }
ls "$work/dist"
python3 -m venv "$work/venv"
site=$("$work/venv/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
.venv/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])" > "$site/dev_deps.pth"
"$work/venv/bin/python" -m pip install --disable-pip-version-check -q --no-deps "$work"/dist/*.whl \
  2>&1 | { grep -v "^WARNING: Location" || true; }
cd "$work"   # away from the checkout: the installed package, not src/
"$work/venv/bin/python" -c "import sae_darkmatter, sys; assert '/dist/' not in sae_darkmatter.__file__ and 'venv' in sae_darkmatter.__file__, sae_darkmatter.__file__"
"$work/venv/bin/python" - <<'PY'
from importlib.metadata import requires, version
from packaging.requirements import Requirement
for line in requires("sae-darkmatter"):
    req = Requirement(line)
    if req.marker is None:  # the core requirements, not the extras
        assert req.specifier.contains(version(req.name), prereleases=True), (req, version(req.name))
print("the wheel's requirements are met")
PY
"$work/venv/bin/darkmatter" --help >/dev/null
"$work/venv/bin/darkmatter" info
echo "wheel OK: $(basename "$work"/dist/*.whl)"
