#!/usr/bin/env bash
# The screenshot of the HTML report's landing page that the README shows (docs/report.png):
#
#   bash docs/make_screenshot.sh [REPORT.html] [OUT.png]
#
# REPORT defaults to results/digits/report.html (written by `make run`), OUT to docs/report.png.
# Headless Chromium (Debian's `chromium`; tests/browser/setup.sh installs it when missing) renders
# the report's single-page app (virtual time, so that its scripts have run) at 1400 x 1100.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
report=${1:-results/digits/report.html}
out=${2:-$here/report.png}
[[ -f $report ]] || { echo "make_screenshot.sh: no report $report (run make run first)" >&2; exit 1; }
browser=$(bash "$here/../tests/browser/setup.sh")
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$browser" --headless --no-sandbox --disable-gpu --no-first-run --hide-scrollbars \
    --user-data-dir="$work/profile" --virtual-time-budget=30000 --window-size=1400,1100 \
    --screenshot="$work/shot.png" "file://$(realpath "$report")" 2>"$work/log" \
    || { cat "$work/log" >&2; exit 1; }
cp "$work/shot.png" "$out.tmp.$$" && mv "$out.tmp.$$" "$out"   # whole file or nothing
echo "wrote $out" >&2
