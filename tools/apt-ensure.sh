#!/bin/sh
# SPDX-License-Identifier: GPL-2.0
#
# Install the Debian packages given that are not installed yet.
#
#   tools/apt-ensure.sh PACKAGE...

set -eu

missing=
for p in "$@"; do
	dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed' ||
		missing="$missing $p"
done
[ -n "$missing" ] || exit 0

echo "Installing Debian packages:$missing"
if [ "$(id -u)" != 0 ]; then
	echo "root is needed to install them" >&2
	exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -q
# shellcheck disable=SC2086 # one word per package
apt-get install -y -q --no-install-recommends $missing
