#!/bin/bash
# SPDX-License-Identifier: GPL-2.0
#
# The newest kernel Debian ships, made usable on Debian 12 for make
# test-kernels: fetched, unpacked into a cache, its module build tools
# rebuilt for this machine.
#
#   tools/newest-kernel.sh CACHE [RELEASE]
#
# Debian's newest amd64 kernel (trixie-backports or sid; RELEASE picks one,
# e.g. 7.3.4+deb13-amd64) cannot be installed on Debian 12: its headers want
# gcc-14 and its kbuild programs glibc 2.38. So nothing is installed. The
# packages are fetched with a private apt configuration (the system's is
# not touched) and unpacked with dpkg-deb into CACHE/RELEASE, a root-like
# tree (usr/lib/modules/RELEASE holds the image, as in Debian 13), and:
#
#   - modpost, objtool and resolve_btfids, which need glibc 2.38, are
#     rebuilt from Debian's linux-source package with this machine's gcc-12
#     (the source package's own orig tarball is not on every mirror);
#   - CACHE/RELEASE/usr/src/linux-headers-RELEASE-gcc12 is a copy of the
#     headers whose compiler-dependent Kconfig symbols (CC_HAS_*,
#     GCC_VERSION, PAHOLE_VERSION, RUST) are derived again for gcc-12,
#     binutils 2.40 and pahole 1.24 by olddefconfig; the generated
#     structure offsets (asm-offsets.h, bounds.h, rq-offsets.h) must come
#     out the same as Debian's, or the script fails. The modules' build
#     link points at this copy;
#   - a sparse new enough for the kernel's checker test is built from sid's
#     source package into CACHE/bin/sparse when Debian 12's is too old;
#   - depmod runs on the tree (the packages ship no modules.dep);
#   - /lib/modules/RELEASE becomes a symbolic link to the tree's modules,
#     which the test VM loads its 9p and KVM modules from.
#
# Prints, last, the release; CACHE/RELEASE/kvmlu-kernel.env names the paths
# (KVMLU_KERNEL_CHECK is the sparse to pass as CHECK=). Everything is done
# once per package version: a second run only checks.
#
# Environment: SUITES (default "trixie-backports sid"); MIRROR (default:
# the first Debian mirror of apt's sources); KCC (default gcc-12); JOBS.

set -euo pipefail

[ $# -ge 1 ] && [ $# -le 2 ] || { echo "usage: $0 CACHE [RELEASE]" >&2; exit 2; }
checkout=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$1"
cache=$(cd "$1" && pwd)
want=${2:-}
kcc=${KCC:-x86_64-linux-gnu-gcc-12}
jobs=${JOBS:-2}
suites=${SUITES:-"trixie-backports sid"}
# A rustc on PATH (rustup's) must not take part in Kconfig's probes.
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
export LC_ALL=C
work=$cache/_work

log() { echo "newest-kernel: $*" >&2; }
die() { log "$*"; exit 1; }

"$checkout/tools/apt-ensure.sh" apt dpkg xz-utils make gcc flex bison bc dwarves kmod \
	libelf-dev libssl-dev >&2

# A private apt: its own sources, lists, archives and an empty dpkg status,
# so that the kernels installed here do not count.
if [ -z "${MIRROR:-}" ]; then
	MIRROR=$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list \
		/etc/apt/sources.list.d/*.sources 2>/dev/null |
		sed -nE 's/^[[:space:]]*(deb(\[[^]]*\])?[[:space:]]+(\[[^]]*\][[:space:]]+)?|URIs:[[:space:]]*)(https?:[^[:space:]]+\/debian)\/?([[:space:]].*)?$/\4/p' |
		head -n1) || true
	MIRROR=${MIRROR:-http://deb.debian.org/debian}
fi
mkdir -p "$work/apt/lists/partial" "$work/apt/cache" "$work/apt/archives/partial" "$work/debs"
{
	for s in $suites; do echo "deb $MIRROR $s main"; done
	echo "deb-src $MIRROR sid main"
} > "$work/apt/sources.list"
: > "$work/apt/status"
apt=(-o "Dir::Etc::SourceList=$work/apt/sources.list" -o Dir::Etc::SourceParts=-
	-o "Dir::State::status=$work/apt/status" -o "Dir::State::Lists=$work/apt/lists"
	-o "Dir::Cache=$work/apt/cache" -o "Dir::Cache::Archives=$work/apt/archives"
	-o APT::Sandbox::User=root)
# The lists are read again at most once a day.
if [ -z "$(find "$work/apt/lists" -name '*Packages*' -mtime -1 2>/dev/null | head -n1)" ]; then
	log "apt-get update ($MIRROR: $suites)"
	apt-get "${apt[@]}" -q --error-on=any update >&2
fi

if [ -z "$want" ]; then
	want=$(apt-cache "${apt[@]}" search --names-only '^linux-image-[0-9].*-amd64$' |
		awk '{print $1}' | sed -n 's/^linux-image-\(.*-amd64\)$/\1/p' |
		grep -vE -- '-(cloud|rt)-amd64$' | sort -V | tail -n1)
	[ -n "$want" ] || die "no linux-image-*-amd64 in $suites"
fi
rel=$want                                        # 7.3.4+deb13-amd64
abi=${rel%-amd64}                                # 7.3.4+deb13
mm=$(echo "$abi" | sed -E 's/^([0-9]+\.[0-9]+).*/\1/')   # 7.3
ver=$(apt-cache "${apt[@]}" show "linux-image-$rel" 2>/dev/null |
	awk '/^Version:/{print $2}' | sort -V | tail -n1)
[ -n "$ver" ] || die "no package linux-image-$rel"
log "$rel, package version $ver"
tree=$cache/$rel
kbuild=$tree/usr/lib/linux-kbuild-$abi
headers=$tree/usr/src/linux-headers-$rel
headers12=$headers-gcc12
mods=$tree/usr/lib/modules/$rel

# 1. The packages. Debian 13 splits the image into linux-binary (the
# kernel) and linux-modules; older layouts name the kbuild package by
# major.minor.
have_pkg() { apt-cache "${apt[@]}" show "$1=$ver" >/dev/null 2>&1; }
pkgs=()
for p in "linux-image-$rel" "linux-binary-$rel" "linux-modules-$rel" "linux-base-$rel" \
	"linux-headers-$rel" "linux-headers-$abi-common" "linux-kbuild-$abi" "linux-source-$mm"; do
	if have_pkg "$p"; then pkgs+=("$p"); fi
done
if ! have_pkg "linux-binary-$rel" && have_pkg "linux-binary-unsigned-$rel"; then
	pkgs+=("linux-binary-unsigned-$rel")
fi
if ! have_pkg "linux-kbuild-$abi" && have_pkg "linux-kbuild-$mm"; then
	pkgs+=("linux-kbuild-$mm")
fi
for need in "linux-headers-$rel" "linux-source-$mm"; do
	printf '%s\n' "${pkgs[@]}" | grep -qx "$need" || die "no package $need=$ver"
done
debs=()
for p in "${pkgs[@]}"; do
	f=$(find "$work/debs" -name "${p}_*.deb" | grep -F "_${ver//:/%3a}_" | head -n1 || true)
	if [ -z "$f" ]; then
		log "download $p=$ver"
		(cd "$work/debs" && apt-get "${apt[@]}" -q download "$p=$ver" >&2)
		f=$(find "$work/debs" -name "${p}_*.deb" | grep -F "_${ver//:/%3a}_" | head -n1)
	fi
	debs+=("$f")
done

stamp=$tree/.kvmlu-extracted
want_stamp=$(printf '%s\n' "${debs[@]}" | grep -v '/linux-source-' | xargs -n1 basename)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want_stamp" ]; then
	log "unpack into $tree"
	rm -rf "$tree"
	mkdir -p "$tree"
	for f in "${debs[@]}"; do
		case $f in */linux-source-*) continue ;; esac
		dpkg-deb -x "$f" "$tree"
	done
	echo "$want_stamp" > "$stamp"
fi
[ -d "$headers" ] && [ -d "$kbuild" ] && [ -f "$mods/vmlinuz" ] ||
	die "unexpected package layout under $tree"
# Merged /usr: depmod -b looks for BASE/lib/modules.
[ -e "$tree/lib" ] || ln -s usr/lib "$tree/lib"
# The flavour headers include the common ones by an absolute /usr/src path.
if grep -q '^include /usr/src/' "$headers/Makefile"; then
	common=$(sed -n 's:^include /usr/src/\([^/]*\)/Makefile$:\1:p' "$headers/Makefile")
	cat > "$headers/Makefile" <<EOF
# kvmlu's tools/newest-kernel.sh: the common headers beside these ones.
kvmlu_headers := \$(patsubst %/,%,\$(dir \$(abspath \$(lastword \$(MAKEFILE_LIST)))))
KBUILD_OUTPUT=\$(kvmlu_headers)
include \$(kvmlu_headers)/../$common/Makefile
EOF
fi

# 2. The source the host programs are built from: a subset of the
# linux-source package's tarball.
src=$work/src/linux-source-$mm
if [ ! -e "$src/.kvmlu-$ver" ]; then
	log "unpack the parts of linux-source-$mm the tools need"
	rm -rf "$src"
	mkdir -p "$work/src"
	srcdeb=$(printf '%s\n' "${debs[@]}" | grep "/linux-source-${mm}_")
	dpkg-deb --fsys-tarfile "$srcdeb" | tar -xO "./usr/src/linux-source-$mm.tar.xz" |
		tar -xJ -C "$work/src" --wildcards \
		"linux-source-$mm/Makefile" "linux-source-$mm/Kbuild" "linux-source-$mm/Kconfig" \
		"linux-source-$mm/scripts" "linux-source-$mm/tools" "linux-source-$mm/include" \
		"linux-source-$mm/arch/x86" "linux-source-$mm/certs" "linux-source-$mm/usr" \
		"linux-source-$mm/init" "linux-source-$mm/security" "linux-source-$mm/kernel" \
		"linux-source-$mm/lib" '*/Kconfig*'
	touch "$src/.kvmlu-$ver"
fi

# 3. Kconfig again with gcc-12, and the host programs, in one output tree.
out=$work/build-$rel
if [ "$(cat "$out/.kvmlu-done" 2>/dev/null)" != "$kcc $ver" ]; then
	log "olddefconfig and modules_prepare with $kcc (log: $out.log)"
	rm -rf "$out"
	mkdir -p "$out"
	cp "$headers/.config" "$out/.config"
	make -C "$src" O="$out" CC="$kcc" HOSTCC="$kcc" olddefconfig > "$out.log" 2>&1
	make -C "$src" O="$out" CC="$kcc" HOSTCC="$kcc" -j"$jobs" modules_prepare >> "$out.log" 2>&1 ||
		{ tail -n 30 "$out.log" >&2; die "modules_prepare failed"; }
	echo "$kcc $ver" > "$out/.kvmlu-done"
fi
diff <(grep -v '^#' "$headers/.config" | sort) <(grep -v '^#' "$out/.config" | sort) \
	> "$tree/config-gcc12.diff" || true

# The shipped programs that do not run here are replaced (originals kept).
runs_here() { ! ldd "$1" 2>&1 | grep -q 'not found'; }
mkdir -p "$work/orig-$rel"
replace() {  # replace PATH_IN_KBUILD PATH_IN_OUT
	local dst=$kbuild/$1 built=$out/$2
	[ -e "$dst" ] || return 0
	runs_here "$dst" && return 0
	[ -x "$built" ] || die "$dst does not run here and $built was not built"
	cp -n "$dst" "$work/orig-$rel/$(echo "$1" | tr / _)"
	install -m755 "$built" "$dst"
	log "replaced $1 with a build by $kcc"
}
replace scripts/mod/modpost.real-lsb-64 scripts/mod/modpost
replace scripts/mod/modpost scripts/mod/modpost
replace tools/objtool/objtool.real-x86 tools/objtool/objtool
replace tools/objtool/objtool tools/objtool/objtool
replace tools/bpf/resolve_btfids/resolve_btfids tools/bpf/resolve_btfids/resolve_btfids
for f in scripts/basic/fixdep scripts/kallsyms scripts/sorttable scripts/sign-file \
	scripts/kconfig/conf scripts/asn1_compiler; do
	replace "$f" "$f"
done
# What is left unusable is only for other architectures.
bad=$(find "$kbuild" -type f -perm -u+x -exec sh -c \
	'head -c4 "$1" | grep -q ELF && ldd "$1" 2>&1 | grep -q "not found" && echo "$1"' _ {} \; |
	grep -vE 'modpost\.real-(lsb-32|msb-32|msb-64)$|objtool\.real-[a-wyz]' || true)
[ -z "$bad" ] || die "still unusable here: $bad"
[ -e "$kbuild/scripts/checker-valid.sh" ] ||
	install -m755 "$src/scripts/checker-valid.sh" "$kbuild/scripts/checker-valid.sh"

if [ "$(cat "$headers12/.kvmlu-gcc12" 2>/dev/null)" != "$kcc $ver" ]; then
	log "headers for $kcc: $headers12"
	for f in include/generated/asm-offsets.h include/generated/bounds.h \
		include/generated/rq-offsets.h; do
		[ ! -e "$headers/$f" ] || cmp -s "$headers/$f" "$out/$f" ||
			die "$f differs when built with $kcc: structure layouts would not match"
	done
	rm -rf "$headers12"
	cp -a "$headers" "$headers12"
	cp "$out/.config" "$headers12/.config"
	cp "$out/include/config/auto.conf" "$headers12/include/config/auto.conf"
	cp "$out/include/generated/autoconf.h" "$headers12/include/generated/autoconf.h"
	if [ -e "$out/include/generated/rustc_cfg" ]; then
		cp "$out/include/generated/rustc_cfg" "$headers12/include/generated/rustc_cfg"
	fi
	# Debian's .kernelvariables names $(CROSS_COMPILE)gcc-14 as CC.
	if [ -e "$headers12/.kernelvariables" ]; then
		sed -i -E "s|^CC = (.*\))[[:space:]]*\\$\(CROSS_COMPILE\)gcc-[0-9]+\$|CC = \1 $kcc|" \
			"$headers12/.kernelvariables"
		grep -q "^CC = .* $kcc\$" "$headers12/.kernelvariables" ||
			die "could not set CC in $headers12/.kernelvariables"
	fi
	echo "$kcc $ver" > "$headers12/.kvmlu-gcc12"
fi
ln -sfn "../../../src/linux-headers-$rel" "$mods/build.debian"
ln -sfn "../../../src/linux-headers-$rel-gcc12" "$mods/build"

# sparse: the kernel's checker test wants __typeof_unqual__ (after 0.6.4).
check=sparse
if [ "$(sh "$kbuild/scripts/checker-valid.sh" sparse --arch=x86_64 -mlittle-endian -m64 \
	2>/dev/null || true)" != 1 ]; then
	check=$cache/bin/sparse
	if [ ! -x "$check" ]; then
		log "build sparse from sid's source package"
		rm -rf "$work/sparse"
		mkdir -p "$work/sparse/src"
		(cd "$work/sparse" && apt-get "${apt[@]}" -q source --download-only sparse >&2)
		tar -xzf "$work"/sparse/sparse_*.orig.tar.gz -C "$work/sparse/src" --strip-components=1
		make -C "$work/sparse/src" -j"$jobs" CC="$kcc" HAVE_SQLITE=no HAVE_LIBXML=no \
			HAVE_GTK=no HAVE_LLVM=no sparse > "$work/sparse/build.log" 2>&1
		mkdir -p "$cache/bin"
		install -m755 "$work/sparse/src/sparse" "$check"
	fi
	[ "$(sh "$kbuild/scripts/checker-valid.sh" "$check" --arch=x86_64 -mlittle-endian -m64)" = 1 ] ||
		die "$check does not pass the kernel's checker-valid.sh"
fi

if [ ! -e "$mods/modules.dep" ] || [ "$stamp" -nt "$mods/modules.dep" ]; then
	log "depmod"
	depmod -b "$tree" "$rel"
fi

if [ -L "/lib/modules/$rel" ] || [ ! -e "/lib/modules/$rel" ]; then
	ln -sfn "$mods" "/lib/modules/$rel"
else
	die "/lib/modules/$rel exists and is not the link this script makes"
fi

cat > "$tree/kvmlu-kernel.env" <<EOF
KVMLU_KERNEL_RELEASE=$rel
KVMLU_KERNEL_PKG_VERSION=$ver
KVMLU_KERNEL_VMLINUZ=$mods/vmlinuz
KVMLU_KERNEL_KDIR=$mods/build
KVMLU_KERNEL_CC=$kcc
KVMLU_KERNEL_CHECK=$check
EOF
echo "$rel"
