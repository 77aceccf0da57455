#!/usr/bin/env bash
# usage: tests/browser/debian-node.sh DIR     (as root, on Debian 12)
#
# Prints the path of a node that is Debian 12's own Node.js 18, so that the browser test runs once
# on what Debian ships even where another nodejs package is installed (NodeSource's, say): the two
# are both called nodejs and cannot be installed side by side. If the installed nodejs is Debian's,
# that is the answer. Otherwise Debian's packages are fetched (apt-get download) and unpacked into
# DIR, and DIR/node is a wrapper that runs them: their libnode through LD_LIBRARY_PATH, and the
# builtins Debian's node loads from /usr/share/nodejs (acorn, cjs-module-lexer, undici), mounted
# there in a private mount namespace, so nothing outside that one process sees them.
set -euo pipefail
[ $# -eq 1 ] || { echo "usage: $0 DIR" >&2; exit 2; }
dir=$1

if dpkg-query -W -f='${Version}' nodejs 2>/dev/null | grep -q '~deb12'; then
  command -v node
  exit 0
fi

if [ ! -x "$dir/node" ]; then
  # Debian's newest nodejs 18 (an installed nodejs that is newer would otherwise be the candidate).
  version=$(apt-cache madison nodejs | awk -F' *[|] *' '$2 ~ /~deb12/ { print $2; exit }')
  [ -n "$version" ] || { echo "debian-node.sh: apt knows no Debian 12 nodejs (apt-get update?)" >&2; exit 1; }
  rm -rf "$dir" && mkdir -p "$dir/debs" "$dir/root"
  (cd "$dir/debs" && apt-get download -qq -o APT::Sandbox::User=root \
    "nodejs=$version" "libnode108=$version" node-acorn node-cjs-module-lexer node-undici)
  for deb in "$dir"/debs/*.deb; do dpkg-deb -x "$deb" "$dir/root"; done
  mkdir -p /usr/share/nodejs  # the mount point; Debian's libjs-* packages use it too
  cat >"$dir/node" <<EOF
#!/bin/sh
# Debian 12's nodejs $version, unpacked by tests/browser/debian-node.sh.
exec unshare --mount --propagation private sh -c 'mount --bind "\$0/usr/share/nodejs" /usr/share/nodejs &&
  LD_LIBRARY_PATH="\$0/usr/lib/$(dpkg-architecture -qDEB_HOST_MULTIARCH)" exec "\$0/usr/bin/node" "\$@"' "$(realpath "$dir")/root" "\$@"
EOF
  chmod +x "$dir/node"
fi
echo "$(realpath "$dir")/node"
