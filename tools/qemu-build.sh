#!/bin/bash
# SPDX-License-Identifier: GPL-2.0
#
# Build the real VMM: QEMU 10.2.2's qemu-system-x86_64 with the patches in
# qemu-patches/series applied, once per source and patch set.
#
#   tools/qemu-build.sh CACHE
#
# CACHE/qemu_10.2.2+ds.orig.tar.xz  Debian's source tarball, fetched once from
#                                   the Debian archive that apt's sources name,
#                                   refused unless its sha256 is the one below
# CACHE/wheels/                     meson and pycotap from PyPI: the +ds tarball
#                                   lacks python/wheels, which configure needs
# CACHE/build-KEY/src               the unpacked, patched tree; built in src/build
# CACHE/build-KEY/.kvmlu-done       written last: the build is complete
# CACHE/current                     -> the build-KEY of the last run
# CACHE/current/qemu-system-x86_64  the binary
# build/qemu/qemu-system-x86_64     a copy in the checkout, which the test VM
#                                   sees (it does not see /var/cache); its
#                                   path is the last line printed
#
# The patches include kvmlu's uAPI header as <linux/kvmlu.h>: it is copied
# from kmod/include/uapi into QEMU's linux-headers/, as QEMU carries the
# kernel's own uAPI headers.
#
# KEY is a sha256 over the tarball's sha256, the series, every patch it lists,
# the uAPI header and the configure flags: an unchanged tree is never rebuilt,
# and builds of other keys except the previous one are deleted.

set -euo pipefail

cache=${1:?usage: $0 CACHE}
checkout=$(cd "$(dirname "$0")/.." && pwd)
patches=$checkout/qemu-patches
uapi=$checkout/kmod/include/uapi/linux/kvmlu.h
version=10.2.2
tarball_name=qemu_${version}+ds.orig.tar.xz
tarball_sha256=be05230fe47a6937cd29f28f562932c8125f9c93c2a82c625198f7a4aa601dfb
# The versions QEMU's pythondeps.toml installs.
wheels="meson==1.9.0 pycotap==1.3.1"
# Debian's python3, so that python3-venv is known to be there.
python=/usr/bin/python3
# What configure needs with the flags below: glib and zlib always, pixman for
# the display devices (q35's default VGA), python3-venv for configure's venv,
# dtc because the +ds tarball has no prebuilt pc-bios/dtb/*.dtb. No libfdt:
# fdt is off and x86_64 does not require it.
packages=(gcc libc6-dev pkg-config ninja-build libglib2.0-dev zlib1g-dev
	libpixman-1-dev device-tree-compiler python3 python3-venv xz-utils curl
	ca-certificates git)
# Only what the guests here use: KVM and TCG, q35, intel-iommu, vfio-pci, edu
# and migration are not meson features and stay in. --disable-download: the
# build never fetches a subproject.
configure_flags=(--target-list=x86_64-softmmu --without-default-features
	--enable-kvm --enable-tcg --enable-pixman --disable-docs --disable-rust
	--disable-user --disable-install-blobs --disable-download)

"$checkout/tools/apt-ensure.sh" "${packages[@]}"
mkdir -p "$cache"
cache=$(cd "$cache" && pwd)
# One build at a time per cache.
exec 9>"$cache/.lock"
flock 9

# The URIs of apt's sources, one-line (*.list) and deb822 (*.sources) format,
# in order, each once.
apt_uris() {
	local f
	for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
		[ -r "$f" ] || continue
		sed -nE 's/^[[:space:]]*deb(-src)?[[:space:]]+(\[[^]]*\][[:space:]]+)?([^[:space:]]+).*/\3/p' "$f"
	done
	for f in /etc/apt/sources.list.d/*.sources; do
		[ -r "$f" ] || continue
		sed -nE 's/^URIs:[[:space:]]*//p' "$f" | tr -s ' \t' '\n'
	done | awk '/^https?:\/\// && !seen[$0]++'
}

sha256_ok() {
	echo "$tarball_sha256  $1" | sha256sum -c --quiet - >/dev/null 2>&1
}

# The tarball: once, from the first source whose pool serves it.
tarball=$cache/$tarball_name
if [ ! -f "$tarball" ]; then
	for uri in $(apt_uris); do
		url=${uri%/}/pool/main/q/qemu/$tarball_name
		echo "qemu: fetching $url"
		curl -fsSL --retry 3 -o "$tarball.part" "$url" && break
		rm -f "$tarball.part"
	done
	[ -f "$tarball.part" ] || { echo "qemu: no apt source serves $tarball_name" >&2; exit 1; }
	if ! sha256_ok "$tarball.part"; then
		rm -f "$tarball.part"
		echo "qemu: refused $url: its sha256 is not $tarball_sha256" >&2
		exit 1
	fi
	mv "$tarball.part" "$tarball"
fi
if ! sha256_ok "$tarball"; then
	echo "qemu: $tarball is not the expected tarball (sha256 $tarball_sha256);" \
		"remove it to fetch it again" >&2
	exit 1
fi

# The patches, in order: the series without comments and blank lines.
series=()
while read -r p _; do
	case $p in '' | '#'*) continue ;; esac
	[ -f "$patches/$p" ] || { echo "qemu: $patches/$p (in series) is missing" >&2; exit 1; }
	series+=("$p")
done < "$patches/series"

key=$({
	echo "$tarball_sha256 $tarball_name"
	sha256sum "$patches/series" | cut -d' ' -f1
	for p in "${series[@]}"; do
		echo "$(sha256sum "$patches/$p" | cut -d' ' -f1) $p"
	done
	echo "$(sha256sum "$uapi" | cut -d' ' -f1) kvmlu.h"
	echo "${configure_flags[*]}"
	echo "$wheels"
} | sha256sum | cut -c1-16)
build=$cache/build-$key
bin=$build/src/build/qemu-system-x86_64

if [ -f "$build/.kvmlu-done" ] && [ -x "$bin" ]; then
	echo "qemu: cached in $build"
else
	start=$(date +%s)
	echo "qemu: building in $build (${#series[@]} patches)"
	rm -rf "$build"
	mkdir -p "$build/src"
	tar -xJf "$tarball" -C "$build/src" --strip-components=1
	# The ceiling keeps git from taking a repository above the tree for the
	# patch's root (git apply would then skip the patch silently).
	for p in "${series[@]}"; do
		echo "qemu: applying $p"
		GIT_CEILING_DIRECTORIES=$build git -C "$build/src" apply "$patches/$p" || {
			echo "qemu: $p does not apply to QEMU $version" >&2
			exit 1
		}
	done
	install -m 644 "$uapi" "$build/src/linux-headers/linux/kvmlu.h"
	# The +ds tarball has no edk2 firmware blobs: do not unpack them.
	sed -i 's/^\( *unpack_edk2_blobs = \)bzip2\.found()$/\1false/' "$build/src/meson.build"
	grep -q '^ \+unpack_edk2_blobs = false$' "$build/src/meson.build" ||
		{ echo "qemu: the edk2 edit of meson.build did not apply" >&2; exit 1; }
	# The wheels configure installs offline.
	if ! ls "$cache"/wheels/meson-*.whl "$cache"/wheels/pycotap-*.whl >/dev/null 2>&1; then
		[ -x "$cache/pip-venv/bin/pip" ] || "$python" -m venv "$cache/pip-venv"
		rm -rf "$cache/wheels" "$cache/wheels.tmp"
		# shellcheck disable=SC2086 # one word per requirement
		"$cache/pip-venv/bin/pip" download -q --no-deps --only-binary=:all: \
			-d "$cache/wheels.tmp" $wheels
		mv "$cache/wheels.tmp" "$cache/wheels"
	fi
	cp "$cache"/wheels/*.whl "$build/src/python/wheels/"
	mkdir -p "$build/src/build"
	(cd "$build/src/build" && nice -n 10 ../configure --python="$python" "${configure_flags[@]}")
	nice -n 10 ninja -C "$build/src/build" -j"$(nproc)" qemu-system-x86_64
	echo "$key" > "$build/.kvmlu-done"
	echo "qemu: built in $(( $(date +%s) - start )) s"
fi

ln -sfn src/build/qemu-system-x86_64 "$build/qemu-system-x86_64"
previous=$(readlink "$cache/current" 2>/dev/null || true)
ln -sfn "build-$key" "$cache/current.tmp"
mv -T "$cache/current.tmp" "$cache/current"
for old in "$cache"/build-*; do
	case ${old##*/} in "build-$key" | "$previous") ;; *) rm -rf "$old" ;; esac
done
out=$checkout/build/qemu
mkdir -p "$out"
cmp -s "$bin" "$out/qemu-system-x86_64" || cp "$bin" "$out/qemu-system-x86_64"
echo "$out/qemu-system-x86_64"
