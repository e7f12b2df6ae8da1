# Shared set-up for scripts/demo and scripts/test. Sourced, not run.
#
# Finds Python >= 3.11, makes sure `python -m venv` works (Debian ships it
# separately as python3-venv), creates .venv in the repository if missing and
# installs boxdisk into it in editable mode. Idempotent: a second run only
# re-checks the install. Callers set BOXDISK_EXTRAS ("test" or empty) first.

set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO_ROOT"

say() { printf '==> %s\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

is_root_with_apt() { [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; }

_APT_UPDATED=0
apt_install() {
    is_root_with_apt || return 1
    if [ "$_APT_UPDATED" -eq 0 ]; then
        say "apt-get update"
        DEBIAN_FRONTEND=noninteractive apt-get update -qq
        _APT_UPDATED=1
    fi
    say "apt-get install $*"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

find_python() {
    local cand
    for cand in python3.11 python3 python3.13 python3.12; do
        if command -v "$cand" >/dev/null 2>&1 &&
            "$cand" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
            command -v "$cand"
            return 0
        fi
    done
    return 1
}

setup_venv() {
    local extras="${BOXDISK_EXTRAS:-}"
    local py venv="$REPO_ROOT/.venv"
    py="$(find_python)" || die "Python >= 3.11 not found (install python3.11 or newer)"

    if [ ! -x "$venv/bin/python" ]; then
        # Debian's python3 lacks ensurepip until python3-venv is installed.
        if ! "$py" -c 'import ensurepip, venv' >/dev/null 2>&1; then
            apt_install python3-venv ||
                die "'$py -m venv' is unavailable; install python3-venv (as root: apt-get install python3-venv)"
        fi
        say "creating .venv with $py ($("$py" --version 2>&1))"
        rm -rf "$venv"
        "$py" -m venv "$venv" || die "could not create $venv"
    fi

    local target="."
    [ -n "$extras" ] && target=".[$extras]"
    # Re-install only when pyproject.toml changed since the last install.
    local stamp="$venv/.boxdisk-installed-$extras-compat"
    if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
        say "installing boxdisk ($target) into .venv"
        # editable_mode=compat: a path entry in a .pth file rather than an import
        # hook, so type checkers (mypy) find the package in the editable install too.
        "$venv/bin/python" -m pip install -q --disable-pip-version-check \
            --config-settings editable_mode=compat -e "$target"
        touch "$stamp"
    fi

    export VIRTUAL_ENV="$venv"
    export PATH="$venv/bin:$PATH"
    PY="$venv/bin/python"
}
