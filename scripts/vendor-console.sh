#!/usr/bin/env bash
# Rebuilds the browser libraries the web console ships: installs the versions pinned in
# scripts/console-vendor/package-lock.json and copies their built ES modules, style sheets and
# licences into src/corral/api/console/static/vendor/ (committed, so neither a build nor the network
# is needed to serve the console). Run it after changing a version in package.json.
set -euo pipefail
cd "$(dirname "$0")/console-vendor"
npm ci --no-audit --no-fund --loglevel=error
out=../../src/corral/api/console/static/vendor
rm -rf "$out"
mkdir -p "$out/xterm" "$out/addon-fit"
# Source maps are left out: the ".map" comment would point at files that are not shipped.
strip_map() { sed '/^\/\/# sourceMappingURL=/d' "$1" >"$2"; }
strip_map node_modules/@xterm/xterm/lib/xterm.mjs "$out/xterm/xterm.js"
cp node_modules/@xterm/xterm/css/xterm.css "$out/xterm/xterm.css"
cp node_modules/@xterm/xterm/LICENSE "$out/xterm/LICENSE"
strip_map node_modules/@xterm/addon-fit/lib/addon-fit.mjs "$out/addon-fit/addon-fit.js"
cp node_modules/@xterm/addon-fit/LICENSE "$out/addon-fit/LICENSE"
node -e 'const l=require("./package-lock.json").packages;
for (const k of ["node_modules/@xterm/xterm","node_modules/@xterm/addon-fit"]) console.log(k.slice(13), l[k].version)' \
  >"$out/VERSIONS"
echo "vendored into src/corral/api/console/static/vendor:"; cat "$out/VERSIONS"
