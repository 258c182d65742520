#!/usr/bin/env bash
# Headless Chromium for tests/integration/test_dashboard.py: Debian's own build (/usr/bin/chromium) from apt, driven by
# the `playwright` Python package of the test extra over CDP. Never `playwright install`: it downloads a browser build
# of its own, which this project does not fetch. A font is installed so screenshots show text.
source "$(dirname "$0")/lib.sh"

apt_install chromium fonts-dejavu-core
/usr/bin/chromium --version >/dev/null 2>&1 || { echo "chromium.sh: /usr/bin/chromium does not run" >&2; exit 1; }
