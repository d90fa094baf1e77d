# Sourced by the other scripts: make sure ./.venv exists, installing python3-venv when missing.
# Usage: ensure_venv DIR PYTHON
SUDO=""
if [ "$(id -u)" != 0 ] && command -v sudo >/dev/null; then SUDO=sudo; fi

apt_install() {
    # Debian packages the project needs, installed only when missing.
    local missing=()
    for pkg in "$@"; do
        dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
    done
    if [ ${#missing[@]} -gt 0 ]; then
        echo "installing Debian packages: ${missing[*]}"
        $SUDO apt-get update -qq
        DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
    fi
}

pip_install() {
    # pip install into the venv at $1, without the machine's notes about absent local indexes.
    local venv=$1; shift
    "$venv/bin/python" -m pip install -q "$@" 2> >(grep -v "^WARNING: Location 'file:" >&2)
}

ensure_venv() {
    local dir=$1 python=$2
    if [ ! -x "$dir/bin/python" ]; then
        if ! "$python" -c "import ensurepip, venv" 2>/dev/null; then
            apt_install python3-venv
        fi
        "$python" -m venv "$dir"
        pip_install "$dir" --upgrade pip
    fi
}
