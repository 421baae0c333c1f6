#!/usr/bin/env bash
# Render a report page in real headless Chromium and check that it shows without errors.
#
#   scripts/check_report_in_chromium.sh report/index.html [EXPECTED_IMAGES]
#
# Passes (exit 0) when, in Chromium:
#   - the page loads with no console message at all (no JavaScript error, no CSP or
#     mixed-content complaint; the report itself has no script, so any message is a fault);
#   - every <img> is decoded (naturalWidth > 0), and there are EXPECTED_IMAGES of them if given;
#   - the page fetched nothing but itself and data: URIs (no external resource), with DNS
#     disabled so that a stray URL could not be fetched anyway.
# How: a copy of the page gets a tiny inline script that writes those counts into
# document.title after the load event; Chromium's --dump-dom prints the DOM, which we read.
# The report given is never modified. Needs Debian's chromium (apt-get install -y chromium);
# CHROMIUM=/path overrides the binary. Set SCREENSHOT=file.png to also keep a screenshot.
set -euo pipefail

page=${1:?usage: check_report_in_chromium.sh REPORT.html [EXPECTED_IMAGES]}
expected=${2:-}
chromium=${CHROMIUM:-/usr/bin/chromium}
[[ -f $page ]] || { echo "FAIL: no such file: $page" >&2; exit 2; }
[[ -x $chromium ]] || { echo "FAIL: $chromium not found (apt-get install -y chromium)" >&2; exit 2; }

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
probe='<script>window.addEventListener("load", function () {
  var images = Array.prototype.slice.call(document.images);
  var decoded = images.filter(function (i) { return i.complete && i.naturalWidth > 0; });
  var external = performance.getEntriesByType("resource").filter(function (e) {
    return e.name.indexOf("data:") !== 0; });
  document.title = "render-check images=" + images.length + " decoded=" + decoded.length +
    " external=" + external.length;
});</script>'
# The probe goes right before </body> (appended if the page has none).
python3 - "$page" "$work/page.html" "$probe" <<'PY'
import sys
text = open(sys.argv[1], encoding="utf-8").read()
at = text.rfind("</body>")
at = len(text) if at < 0 else at
open(sys.argv[2], "w", encoding="utf-8").write(text[:at] + sys.argv[3] + text[at:])
PY

flags=(--headless --no-sandbox --disable-gpu --disable-quic --no-first-run
       --disable-background-networking --disable-component-update --disable-sync
       --user-data-dir="$work/profile" --enable-logging=stderr --v=0
       --host-resolver-rules="MAP * ~NOTFOUND" --virtual-time-budget=10000)
status=0
timeout 120 "$chromium" "${flags[@]}" --dump-dom "file://$work/page.html" \
    >"$work/dom.html" 2>"$work/stderr.txt" || status=$?
if [[ -n ${SCREENSHOT:-} ]]; then
    timeout 120 "$chromium" "${flags[@]}" --window-size=1280,4000 \
        --screenshot="$SCREENSHOT" "file://$work/page.html" >/dev/null 2>&1 || true
fi

fail=0
if [[ $status -ne 0 ]]; then
    echo "FAIL: chromium exited with status $status" >&2; fail=1
fi
if grep -q ":CONSOLE" "$work/stderr.txt"; then
    echo "FAIL: console messages:" >&2; grep ":CONSOLE" "$work/stderr.txt" >&2; fail=1
fi
title=$(grep -o 'render-check images=[0-9]* decoded=[0-9]* external=[0-9]*' \
        "$work/dom.html" | head -n 1 || true)
if [[ -z $title ]]; then
    echo "FAIL: the page did not finish loading (no render-check title in the DOM)" >&2
    exit 1
fi
read -r images decoded external < <(sed -E 's/.*images=([0-9]+) decoded=([0-9]+) external=([0-9]+)/\1 \2 \3/' <<<"$title")
if [[ $decoded -ne $images ]]; then
    echo "FAIL: only $decoded of $images images decoded" >&2; fail=1
fi
if [[ $external -ne 0 ]]; then
    echo "FAIL: the page fetched $external external resource(s)" >&2; fail=1
fi
if [[ -n $expected && $images -ne $expected ]]; then
    echo "FAIL: $images images, expected $expected" >&2; fail=1
fi
if [[ $fail -ne 0 ]]; then exit 1; fi
echo "OK: $page rendered in $("$chromium" --version 2>/dev/null | head -n 1):" \
     "$images images, all decoded, no console message, no external resource"
