#!/usr/bin/env bash
# The iptables tools of the agent's image, from Debian's packages (scripts/build-image.sh copies the tree this
# prints into the image's root filesystem).
#
# Why: the repair controller repairs a broken pod in place from inside the agent's container with the plugin's own
# programming path; with the iptables backends (iptables_backend auto/legacy/nft, the default) that runs
# iptables-{legacy,nft}-{save,restore} in the pod's netns, so the image must carry them, as Istio's image does
# (native nftables runs no program). They are GPL-2.0 programs run as separate processes, never linked to ours;
# each package's copyright file and the list of packages and versions (usr/share/doc/meshcni-image/packages.txt,
# for `apt-get source NAME=VERSION`) go with them.
#
# What goes in: the two multi-call binaries xtables-legacy-multi and xtables-nft-multi with the eight names the
# backends run (/usr/sbin/{ip,ip6}tables-{legacy,nft}-{save,restore}), the xtables extensions they load, every
# shared library those need (resolved from their DT_NEEDED entries among the packages' files: a library that is
# not there fails the build), the dynamic loader, and netbase's /etc/protocols (protocol names in saves).
#
# The packages are fetched with `apt-get download` (apt's own client; an `apt-get update` first when apt knows no
# candidate and we are root) at the versions apt offers, unpacked with dpkg-deb, and the tree is cached in
# $IMAGE_CACHE/iptables-<key> (default /var/cache/meshcni; key: the packages' names and versions), so a rebuild
# with the same versions downloads nothing.
#
#   scripts/image-iptables.sh        prints the cached tree's path on its last line
set -euo pipefail

die() { echo "image-iptables: $*" >&2; exit 1; }
say() { echo "image-iptables: $*" >&2; }

PKGS=(iptables libxtables12 libip4tc2 libip6tc2 libnftnl11 libmnl0 libnfnetlink0 libnetfilter-conntrack3 libc6
      netbase)
TOOLS=(iptables-legacy-save iptables-legacy-restore ip6tables-legacy-save ip6tables-legacy-restore
       iptables-nft-save iptables-nft-restore ip6tables-nft-save ip6tables-nft-restore)
ARCH_DIR=x86_64-linux-gnu

for t in apt-get apt-cache dpkg-deb readelf sha256sum; do
    command -v "$t" >/dev/null 2>&1 || die "$t not found (a Debian machine is needed to build the image)"
done

candidates() { # one "name=version" line per package, or nothing when apt knows no candidate for one
    local p v
    for p in "${PKGS[@]}"; do
        v=$(apt-cache policy "$p" 2>/dev/null | sed -n 's/^ *Candidate: //p')
        [ -n "$v" ] && [ "$v" != "(none)" ] || return 1
        echo "$p=$v"
    done
}
if ! WANT=$(candidates); then
    [ "$(id -u)" = 0 ] || die "apt knows no candidate for one of ${PKGS[*]} (run apt-get update as root)"
    say "apt knows no candidate for one of ${PKGS[*]}: apt-get update"
    apt-get -o DPkg::Lock::Timeout=600 update -qq >&2 || die "apt-get update failed"
    WANT=$(candidates) || die "apt knows no candidate for one of ${PKGS[*]} even after apt-get update"
fi
KEY=$(printf '%s\n' "$WANT" | sha256sum | cut -c1-12)
ROOT=${IMAGE_CACHE:-/var/cache/meshcni}
if ! mkdir -p "$ROOT" 2>/dev/null || [ ! -w "$ROOT" ]; then
    ROOT=${CARGO_TARGET_DIR:-$(cd "$(dirname "$0")/.." && pwd)/target}/image-cache
    mkdir -p "$ROOT"
fi
CACHE=$ROOT/iptables-$KEY
if [ -f "$CACHE/complete" ]; then
    say "cached: $CACHE ($(printf '%s ' $WANT))"
    echo "$CACHE/rootfs"
    exit 0
fi

TMP=$(mktemp -d "$ROOT/.iptables-$KEY.XXXXXX")
trap 'rm -rf "$TMP"' EXIT
mkdir -p "$TMP/debs" "$TMP/x" "$TMP/rootfs"
say "downloading $(printf '%s ' $WANT)"
# shellcheck disable=SC2086 # one argument per package
# (apt's warning that it downloads as root, its _apt user being unable to write our 0700 temp dir, is dropped.)
(cd "$TMP/debs" && apt-get download -qq $WANT 2>&1 | grep -v '^W: Download is performed unsandboxed' >&2
    exit "${PIPESTATUS[0]}") || die "apt-get download failed"
for d in "$TMP"/debs/*.deb; do dpkg-deb -x "$d" "$TMP/x"; done

X=$TMP/x
R=$TMP/rootfs
copy() { # a path relative to the unpacked tree, kept as it is (a symlink stays one)
    mkdir -p "$R/$(dirname "$1")"
    cp -a "$X/$1" "$R/$1"
}
mkdir -p "$R/usr/sbin"
for m in xtables-legacy-multi xtables-nft-multi; do
    [ -f "$X/usr/sbin/$m" ] || die "the iptables package has no /usr/sbin/$m"
    copy "usr/sbin/$m"
done
for t in "${TOOLS[@]}"; do
    target=$(readlink "$X/usr/sbin/$t" 2>/dev/null) || die "the iptables package has no /usr/sbin/$t"
    case "$target" in xtables-legacy-multi | xtables-nft-multi) ;; *) die "/usr/sbin/$t points to $target" ;; esac
    copy "usr/sbin/$t"
done
[ -d "$X/usr/lib/$ARCH_DIR/xtables" ] || die "no xtables extensions in the packages (usr/lib/$ARCH_DIR/xtables)"
copy "usr/lib/$ARCH_DIR/xtables"

# Shared libraries: the DT_NEEDED closure of the binaries and extensions, among the packages' library dirs.
find_lib() { # soname -> its path relative to the unpacked tree
    local d
    for d in "lib/$ARCH_DIR" "usr/lib/$ARCH_DIR"; do
        [ -e "$X/$d/$1" ] && { echo "$d/$1"; return 0; }
    done
    return 1
}
needed() { readelf -d "$1" 2>/dev/null | sed -n 's/.*(NEEDED).*\[\(.*\)\]$/\1/p'; }
declare -A have=()
queue=("$R/usr/sbin/xtables-legacy-multi" "$R/usr/sbin/xtables-nft-multi")
mapfile -t -O "${#queue[@]}" queue < <(find "$R/usr/lib/$ARCH_DIR/xtables" -name '*.so' -type f)
while [ "${#queue[@]}" -gt 0 ]; do
    f=${queue[0]}
    queue=("${queue[@]:1}")
    for so in $(needed "$f"); do
        [ -n "${have[$so]:-}" ] && continue
        rel=$(find_lib "$so") || die "$so (needed by ${f#"$R"/}) is in none of ${PKGS[*]}"
        have[$so]=1
        copy "$rel"
        # The soname is usually a link to the versioned file: copy that too, and scan the real file.
        real=$(readlink -f "$X/$rel")
        real_rel=${real#"$X"/}
        [ "$real_rel" = "$rel" ] || copy "$real_rel"
        queue+=("$R/$real_rel")
    done
done
interp=$(readelf -l "$R/usr/sbin/xtables-nft-multi" | sed -n 's/.*Requesting program interpreter: \(.*\)\]$/\1/p')
[ -n "$interp" ] || die "xtables-nft-multi has no program interpreter"
copy "${interp#/}"
loader=$(readlink "$X/${interp#/}" || true)
if [ -n "$loader" ]; then
    case "$loader" in /*) loader=${loader#/} ;; *) loader=$(dirname "${interp#/}")/$loader ;; esac
    copy "$loader"
fi
[ -f "$X/etc/protocols" ] || die "netbase has no /etc/protocols"
copy etc/protocols

mkdir -p "$R/usr/share/doc/meshcni-image"
{
    echo "Debian packages whose files are in this image (sources: apt-get source NAME=VERSION):"
    printf '%s\n' $WANT
} > "$R/usr/share/doc/meshcni-image/packages.txt"
for p in "${PKGS[@]}"; do
    [ -f "$X/usr/share/doc/$p/copyright" ] || die "$p has no copyright file"
    copy "usr/share/doc/$p/copyright"
done

# Into place with one rename, so a build running beside this one never sees half a tree: if another one put its
# (identical) tree there first, that one is used.
mkdir "$TMP/final"
mv "$R" "$TMP/final/rootfs"
printf '%s\n' "$WANT" > "$TMP/final/complete"
if ! mv -T "$TMP/final" "$CACHE" 2>/dev/null; then
    if [ ! -f "$CACHE/complete" ]; then
        rm -rf "$CACHE" # left by an interrupted older build
        mv -T "$TMP/final" "$CACHE"
    fi
fi
say "unpacked into $CACHE: $(find "$CACHE/rootfs" -type f | wc -l) files, $(du -sh "$CACHE/rootfs" | cut -f1)"
echo "$CACHE/rootfs"
