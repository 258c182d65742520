#!/usr/bin/env bash
# wrk (Debian's 4.1) for the load test in tests/integration/test_http_conformance.py: installed only, never started here.
source "$(dirname "$0")/lib.sh"
apt_install wrk
command -v wrk >/dev/null
