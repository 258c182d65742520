#!/usr/bin/env bash
# A real Kubernetes control plane for tests/integration/test_kube_real.py: etcd 3.4 from apt, and kube-apiserver +
# kubectl v1.20.2 built from Debian's own source package `kubernetes` (Go dependencies vendored, no network for Go).
# The first run takes 10-15 min on two busy cores; later runs find the binaries in $SHEPHERD_COMPONENTS/bin and
# do nothing.
source "$(dirname "$0")/lib.sh"

apt_install etcd-server

BIN="$SHEPHERD_COMPONENTS/bin"
if [ -x "$BIN/kube-apiserver" ] && [ -x "$BIN/kubectl" ]; then
    exit 0
fi

apt_install golang-go rsync make dpkg-dev

sudo=""
[ "$(id -u)" -ne 0 ] && sudo="sudo"

# deb-src entries for the machine's own Debian suites, derived from its deb entries (deb822 and one-line formats).
if ! apt-cache showsrc kubernetes 2>/dev/null | grep '^Package: kubernetes$' >/dev/null; then
    derived="$(mktemp)"
    for f in /etc/apt/sources.list.d/*.sources; do
        [ -f "$f" ] || continue
        awk 'BEGIN { RS = ""; ORS = "\n\n" }
             /(^|\n)Types:[^\n]*(^| )deb( |\n|$)/ && /(^|\n)URIs:[^\n]*debian/ {
                 sub(/(^|\n)Types:[^\n]*/, "\nTypes: deb-src"); sub(/^\n/, ""); print }' "$f" >>"$derived"
    done
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
        [ -f "$f" ] || continue
        grep -E '^deb[[:space:]].*debian' "$f" | sed -E 's/^deb[[:space:]]/deb-src /' >>"$derived.list" || true
    done
    [ -s "$derived" ] && $sudo cp "$derived" /etc/apt/sources.list.d/shepherd-deb-src.sources
    [ -s "$derived.list" ] && $sudo cp "$derived.list" /etc/apt/sources.list.d/shepherd-deb-src.list
    rm -f "$derived" "$derived.list"
    $sudo apt-get update -qq
fi

work="$SHEPHERD_COMPONENTS/src/kubernetes"
mkdir -p "$work"
cd "$work"
if [ ! -d source ]; then  # unpacked under another name first, so an interrupted run never leaves half a tree
    rm -rf source.tmp kubernetes_*
    apt-get source --download-only kubernetes
    dpkg-source -x kubernetes_*.dsc source.tmp
    mv source.tmp source
fi
cd source

export GOPROXY=off GOFLAGS=-mod=vendor GO111MODULE=on
for what in kube-apiserver kubectl; do
    if [ ! -x "$BIN/$what" ]; then
        nice -n 10 make WHAT="cmd/$what"
        install -m 0755 "_output/bin/$what" "$BIN/$what.tmp"
        mv "$BIN/$what.tmp" "$BIN/$what"
    fi
done

# The source tree and build output (~2 GB) are not needed once the binaries are installed.
cd "$SHEPHERD_COMPONENTS"
rm -rf "$work"
