#!/bin/sh
# SPDX-License-Identifier: GPL-2.0
#
# Build kvmlu's modules for another kernel than the checkout's, in a copy of
# the module sources, so the in-tree build (for KVER) is left alone.
#
#   tools/build-modules.sh RELEASE OUTDIR [MAKE_ARGS...]
#
# The modules land in OUTDIR/kmod/, built W=1 with warnings as errors;
# MAKE_ARGS go to Kbuild (C=2 runs sparse over every source).

set -eu

release=$1
out=$2
shift 2
src=$(cd "$(dirname "$0")/.." && pwd)
kdir=/lib/modules/$release/build

[ -d "$kdir" ] || { echo "no $kdir: install linux-headers-$release" >&2; exit 1; }
rm -rf "$out/kmod"
mkdir -p "$out"
cp "$src/Kbuild" "$out/"
(cd "$src" && find kmod -type f \( -name '*.[ch]' -o -name Kbuild \) ! -name '*.mod.c' \
	-exec cp --parents -t "$out" {} +)
make -C "$kdir" M="$out" W=1 KCFLAGS=-Werror "$@" modules
