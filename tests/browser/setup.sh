#!/usr/bin/env bash
# Headless Chromium for tests/test_browser.py (the HTML report opened in a real browser).
#
#   bash tests/browser/setup.sh      install Debian's `chromium` package if no chromium is found
#
# Needs root and apt-get (Debian/Ubuntu) when chromium is missing; exit status 3 means it cannot
# be installed here (the browser test then fails under `make test`, which sets
# SUBMERGE_REQUIRE_BROWSER=1, and skips when run on its own). `make test` runs this script, as it
# runs tests/slurm/cluster.sh for the SLURM packages. Prints the browser's path.
set -euo pipefail

log() { echo "browser/setup.sh: $*" >&2; }
unavailable() { log "cannot install chromium: $*"; exit 3; }

find_browser() {
    local name
    for name in "${SUBMERGE_CHROMIUM:-}" chromium chromium-browser; do
        [[ -n $name ]] && command -v "$name" >/dev/null && { command -v "$name"; return 0; }
    done
    return 1
}

if ! find_browser >/dev/null; then
    ((EUID == 0)) || unavailable "chromium is not installed and I am not root (cannot apt-get)"
    command -v apt-get >/dev/null || unavailable "chromium is not installed and there is no apt-get"
    log "installing chromium with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq || unavailable "apt-get update failed (no package mirror reachable?)"
    apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core >/dev/null \
        || unavailable "apt-get install chromium failed"
fi
browser=$(find_browser) || unavailable "chromium still not found after installing it"
"$browser" --headless --no-sandbox --version >&2 || unavailable "$browser does not start"
echo "$browser"
