#!/usr/bin/env bash
# Prometheus (Debian's 2.42) for tests/integration/test_prometheus.py: installed only, never started here.
source "$(dirname "$0")/lib.sh"
apt_install prometheus
prometheus --version >/dev/null
