#!/usr/bin/env bash
# Render a survfuse report.html in headless Chromium and save a PNG screenshot.
#   usage: scripts/screenshot_report.sh RUN_DIR/report.html [OUT.png] [WIDTH,HEIGHT]
# For a check of every figure and one screenshot per section, use scripts/render_report.py.
# Needs Debian's chromium (`apt-get install -y chromium`). The page is 1040 px wide at most, so
# the default 1100 px window shows it without sideways scrolling.
set -euo pipefail
if [[ $# -lt 1 ]]; then
  echo "usage: $0 REPORT_HTML [OUT_PNG] [WIDTH,HEIGHT]" >&2
  exit 2
fi
html=$(realpath "$1")
out=$(realpath -m "${2:-${1%.html}.png}")
size=${3:-1100,2400}
browser=$(command -v chromium || command -v chromium-browser || command -v google-chrome || true)
if [[ -z "$browser" ]]; then
  echo "error: headless Chromium not found (apt-get install -y chromium)" >&2
  exit 1
fi
profile=$(mktemp -d)
trap 'rm -rf "$profile"' EXIT
"$browser" --headless --no-sandbox --disable-gpu --no-first-run \
  --disable-background-networking --disable-component-update --disable-sync \
  --user-data-dir="$profile" --hide-scrollbars --window-size="$size" \
  --screenshot="$out" "file://$html" >/dev/null 2>&1
test -s "$out"
echo "$out"
