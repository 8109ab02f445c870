#!/usr/bin/env bash
# The console's front-end dependencies, as pinned in package-lock.json, installed with `npm ci`
# into DIR (default: a temporary folder, never this source tree), then either copied into
# vendor/ (which the cloud binary embeds, so building Rust never needs Node) or compared with it.
#   vendor.sh [DIR]          install and copy into vendor/
#   vendor.sh --check [DIR]  install and fail when vendor/ differs (CI); DIR keeps playwright-core
#                            for the browser test (tests/e2e.mjs, CONSOLE_DEPS=DIR)
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
CHECK=
[ "${1:-}" = --check ] && { CHECK=1; shift; }
DIR=${1:-}
if [ -z "$DIR" ]; then DIR=$(mktemp -d); trap 'rm -rf "$DIR"' EXIT; fi
mkdir -p "$DIR"
cp "$HERE/package.json" "$HERE/package-lock.json" "$DIR/"
(cd "$DIR" && npm ci --silent --no-audit --no-fund >/dev/null)
FILES=(
    "htm/preact/standalone.module.js:preact-htm.js"
    "uplot/dist/uPlot.iife.min.js:uplot.js"
    "uplot/dist/uPlot.min.css:uplot.css"
    "htm/LICENSE:LICENSE-htm"
    "uplot/LICENSE:LICENSE-uplot"
)
status=0
for f in "${FILES[@]}"; do
    from=$DIR/node_modules/${f%%:*} to=$HERE/vendor/${f##*:}
    if [ -n "$CHECK" ]; then
        cmp -s "$from" "$to" || { echo "vendor: $to differs from the lockfile's ${f%%:*} (run cloud/console/vendor.sh)"; status=1; }
    else
        cp "$from" "$to"
    fi
done
exit $status
