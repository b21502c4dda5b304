#!/bin/bash
# SPDX-License-Identifier: GPL-2.0
#
# Build the debug kernel that `make test-debug` boots, once, and the kvmlu
# modules against it, every time.
#
#   tools/debug-kernel.sh CACHE MODULES
#
# CACHE/linux-debug   Debian's linux-source-6.1, configured from virtme-ng's
#                     minimal config plus tools/debug-kernel.config (KASAN,
#                     lockdep, might_sleep checks, kmemleak, VFIO and the
#                     Intel IOMMU built in), built with bzImage and modules.
# MODULES             a copy of the checkout's Kbuild and kmod/, built
#                     against that tree with W=1 and -Werror. It must be a
#                     path the test VM sees: virtme-ng hides /var/cache.
#
# The kernel is rebuilt only when the fragment or the source package changes:
# CACHE/linux-debug/.kvmlu-stamp records both.

set -euo pipefail

cache=${1:?usage: $0 CACHE MODULES}
mods=${2:?usage: $0 CACHE MODULES}
checkout=$(cd "$(dirname "$0")/.." && pwd)
fragment=$checkout/tools/debug-kernel.config
tarball=/usr/src/linux-source-6.1.tar.xz
tree=$cache/linux-debug
jobs=$(nproc)

[ -r "$tarball" ] || { echo "$tarball missing: install linux-source-6.1" >&2; exit 1; }
mkdir -p "$cache"

stamp="$(sha256sum "$fragment" | cut -d' ' -f1) $(dpkg-query -W -f='${Version}' linux-source-6.1)"
if [ -f "$tree/arch/x86/boot/bzImage" ] && [ -f "$tree/Module.symvers" ] &&
   [ "$(cat "$tree/.kvmlu-stamp" 2>/dev/null)" = "$stamp" ]; then
	echo "debug kernel: cached in $tree"
else
	start=$(date +%s)
	echo "debug kernel: building in $tree (about 20 minutes on 2 cores)"
	rm -rf "$tree" "$tree.tmp"
	mkdir -p "$tree.tmp"
	tar -xJf "$tarball" -C "$tree.tmp" --strip-components=1
	mv "$tree.tmp" "$tree"
	# vng must be the venv's (its helpers are found next to it).
	(cd "$tree" && vng --kconfig --config "$fragment")
	make -C "$tree" olddefconfig
	# Every line of the fragment must have survived olddefconfig.
	while IFS= read -r line; do
		case $line in
		CONFIG_*=n) grep -qx "# ${line%=n} is not set" "$tree/.config" || missing=$line ;;
		CONFIG_*) grep -qx "$line" "$tree/.config" || missing=$line ;;
		*) continue ;;
		esac
		if [ -n "${missing:-}" ]; then
			echo "debug kernel: $missing did not stick in .config" >&2
			exit 1
		fi
	done < "$fragment"
	make -C "$tree" -j"$jobs" bzImage modules
	echo "$stamp" > "$tree/.kvmlu-stamp"
	echo "debug kernel: built in $(( $(date +%s) - start )) s"
fi

# The modules: a fresh copy of the sources, so the checkout's own build for
# the installed kernel is left alone.
rm -rf "$mods"
mkdir -p "$mods"
cp -a "$checkout/Kbuild" "$checkout/kmod" "$mods/"
find "$mods" \( -name '*.o' -o -name '*.ko' -o -name '*.mod*' -o -name '.*.cmd' \
	-o -name Module.symvers -o -name modules.order \) -delete
make -C "$tree" M="$mods" W=1 KCFLAGS=-Werror -j"$jobs" modules
