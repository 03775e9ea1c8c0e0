#!/usr/bin/env bash
# OHIF 3's prebuilt viewer (the dist/ of the npm package @ohif/app), fetched once at setup by ./dev setup:
# `npm pack` of the pinned version, its sha512 checked against the one pinned here, dist/ unpacked under
# tests/viewer/node_modules/@ohif/app/ (ignored by git). The tests never download anything.
set -euo pipefail
cd "$(dirname "$0")"
VERSION=3.13.2
INTEGRITY="sha512-WZdxmpmG7rqFgW9ZJLcbgr3XCtLi1KDNPoMaeY5PPe6j4G4fjEjjkycZM6C6Zk2F87BKxFfpq+jd5xXZB9E8EA=="
TARGET=node_modules/@ohif/app
if [ -f "$TARGET/dist/index.html" ] && [ "$(cat "$TARGET/.version" 2>/dev/null)" = "$VERSION" ]; then exit 0; fi
command -v npm >/dev/null || { echo "npm is missing: the OHIF viewer test will be skipped" >&2; exit 0; }
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
(cd "$work" && npm pack --silent "@ohif/app@$VERSION" >/dev/null)
tarball="$work/ohif-app-$VERSION.tgz"
got="sha512-$(openssl dgst -sha512 -binary "$tarball" | base64 -w0)"
[ "$got" = "$INTEGRITY" ] || { echo "@ohif/app $VERSION: sha512 differs from the pinned one" >&2; exit 1; }
rm -rf "$TARGET"; mkdir -p "$TARGET"
tar xzf "$tarball" -C "$TARGET" --strip-components=1 package/dist package/package.json
echo "$VERSION" > "$TARGET/.version"
