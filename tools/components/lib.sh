# Shared by the component scripts: where builds go, and apt without prompts (sudo when not root).
set -euo pipefail
SHEPHERD_COMPONENTS="${SHEPHERD_COMPONENTS:-$HOME/.cache/shepherd-components}"
mkdir -p "$SHEPHERD_COMPONENTS/bin"
export SHEPHERD_COMPONENTS

apt_install() {
    local missing=()
    for pkg in "$@"; do
        dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    local sudo=""
    [ "$(id -u)" -ne 0 ] && sudo="sudo"
    # Wait for the dpkg lock rather than fail when another install is running.
    $sudo apt-get -o DPkg::Lock::Timeout=600 update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends \
        "${missing[@]}"
}
