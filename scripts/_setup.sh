# Shared set-up for scripts/demo and scripts/test (sourced, not run).
# Makes a virtualenv with the package installed, and installs database
# server packages with apt-get when their binaries are missing.
#
# The sourcing script sets VENV_NAME (scripts/demo: .venv-demo, scripts/test:
# .venv): the demo's venv holds only what a user installs, so it runs without
# the test extras (and without greenlet, which only the asyncio extra brings).
# SQLALCHEMY_REPLICAS_VENV overrides the path.
# SQLALCHEMY_REPLICAS_SQLALCHEMY=2.0.50 installs exactly that SQLAlchemy, in a
# venv of its own (.venv-sqlalchemy-2.0.50): CI runs the suite on the lowest
# SQLAlchemy the package declares as well as on the newest.

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SQLALCHEMY_PIN="${SQLALCHEMY_REPLICAS_SQLALCHEMY:-}"
VENV="${SQLALCHEMY_REPLICAS_VENV:-$ROOT/${VENV_NAME:-.venv}${SQLALCHEMY_PIN:+-sqlalchemy-$SQLALCHEMY_PIN}}"
PY="$VENV/bin/python"

say() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

_apt_updated=""
apt_install() {
    # apt_install PACKAGE...: install Debian/Ubuntu packages (as root, or with sudo).
    local sudo=""
    if [ "$(id -u)" -ne 0 ]; then
        if command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
            sudo="sudo"
        else
            die "missing $*; install them with: sudo apt-get install -y $*"
        fi
    fi
    command -v apt-get >/dev/null || die "missing $*, and this is no apt-based system: install them by hand"
    if [ -z "$_apt_updated" ]; then
        say "apt-get update"
        $sudo env DEBIAN_FRONTEND=noninteractive apt-get update -qq
        _apt_updated=1
    fi
    say "apt-get install $*"
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

find_python() {
    local candidate
    for candidate in python3.13 python3.12 python3.11 python3.10 python3; do
        if command -v "$candidate" >/dev/null &&
            "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; then
            command -v "$candidate"
            return 0
        fi
    done
    return 1
}

ensure_venv() {
    # ensure_venv EXTRAS: a venv at $VENV with this package installed editable, with
    # EXTRAS (and SQLAlchemy $SQLALCHEMY_PIN when set).
    local extras="$1" python stamp want
    if [ ! -x "$PY" ]; then
        python="$(find_python)" || {
            apt_install python3 python3-venv
            python="$(find_python)" || die "Python 3.10 or newer is required"
        }
        say "creating virtualenv $VENV ($("$python" --version))"
        if ! "$python" -m venv "$VENV" 2>/dev/null; then
            apt_install python3-venv
            rm -rf "$VENV"
            "$python" -m venv "$VENV"
        fi
    fi
    stamp="$VENV/.sqlalchemy-replicas-installed"
    want="$extras $SQLALCHEMY_PIN $(cksum <"$ROOT/pyproject.toml")"
    if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
        say "installing sqlalchemy-replicas[$extras]${SQLALCHEMY_PIN:+ with sqlalchemy==$SQLALCHEMY_PIN} into $VENV"
        if ! { "$PY" -m pip install --disable-pip-version-check --upgrade pip &&
            "$PY" -m pip install --disable-pip-version-check -e "$ROOT[$extras]" \
                ${SQLALCHEMY_PIN:+"sqlalchemy==$SQLALCHEMY_PIN"}; } \
            >"$VENV/pip-install.log" 2>&1; then
            tail -n 30 "$VENV/pip-install.log" >&2
            die "pip install failed; full log: $VENV/pip-install.log"
        fi
        printf '%s' "$want" >"$stamp"
    fi
}

have_system_postgres() {
    command -v initdb >/dev/null || compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null
}

have_mariadb() {
    command -v mariadbd >/dev/null || [ -x /usr/sbin/mariadbd ] || [ -x /usr/local/sbin/mariadbd ]
}
