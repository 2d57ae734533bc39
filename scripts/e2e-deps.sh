#!/usr/bin/env bash
# Debian packages and the source entry the real-node test (scripts/e2e-node.sh) needs. Idempotent; root.
#
# Kubernetes comes from Debian's `kubernetes` source package, so apt needs a deb-src entry. It is written in its
# own file, /etc/apt/sources.list.d/meshcni-deb-src.sources, derived from the Debian archive entries the machine
# already uses (same URIs, suites, components and keyring: nothing new is trusted or reached). It stays after the
# test, as the installed packages do.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
APT="apt-get -o DPkg::Lock::Timeout=600"
SRC_FILE=/etc/apt/sources.list.d/meshcni-deb-src.sources

die() { echo "e2e-deps: $*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || die "needs root"

# One deb-src stanza per enabled `deb` entry of Debian's archive (deb822 files and one-line lists alike).
deb_src_entries() {
    python3 - "$@" <<'PY'
import glob, re, sys

def debian(uri, signed):
    return "debian-archive-keyring" in (signed or "") or re.search(r"/debian(-security)?/?$", uri or "")

out = []
for path in sorted(glob.glob("/etc/apt/sources.list.d/*.sources")):
    if path.endswith("/meshcni-deb-src.sources"):
        continue
    for stanza in re.split(r"\n\s*\n", open(path).read()):
        fields = {}
        for line in stanza.splitlines():
            if line.startswith("#") or ":" not in line:
                continue
            k, v = line.split(":", 1)
            fields[k.strip().lower()] = v.strip()
        if "deb" not in fields.get("types", "").split() or fields.get("enabled", "yes").lower() == "no":
            continue
        if not debian(fields.get("uris"), fields.get("signed-by")):
            continue
        out.append((fields["uris"], fields["suites"], fields.get("components", "main"), fields.get("signed-by")))
for path in ["/etc/apt/sources.list"] + sorted(glob.glob("/etc/apt/sources.list.d/*.list")):
    try:
        lines = open(path).read().splitlines()
    except OSError:
        continue
    for line in lines:
        m = re.match(r"^\s*deb\s+(\[[^\]]*\]\s+)?(\S+)\s+(\S+)\s+(.+)$", line)
        if not m:
            continue
        opts, uri, suite, comps = m.group(1) or "", m.group(2), m.group(3), m.group(4).split("#")[0].strip()
        signed = re.search(r"signed-by=(\S+?)\]?(\s|$)", opts)
        signed = signed.group(1).rstrip("]") if signed else None
        if debian(uri, signed):
            out.append((uri, suite, comps, signed))
for uri, suites, comps, signed in out:
    print("Types: deb-src")
    print("URIs: " + uri)
    print("Suites: " + suites)
    print("Components: " + comps)
    if signed:
        print("Signed-By: " + signed)
    print()
PY
}

wanted=$(deb_src_entries)
[ -n "$wanted" ] || die "no Debian archive entry found in /etc/apt/sources.list*: cannot add its deb-src"
fresh=0
if [ ! -f "$SRC_FILE" ] || [ "$(cat "$SRC_FILE")" != "$(printf '%s' "$wanted")" ]; then
    printf '%s\n' "$wanted" > "$SRC_FILE"
    fresh=1
fi

PKGS=(etcd-server containerd runc containernetworking-plugins busybox-static golang-go rsync jq dpkg-dev
      musl-tools patch iptables iproute2 openssl curl util-linux procps python3 ca-certificates)
missing=()
for p in "${PKGS[@]}"; do
    dpkg-query -W -f='${Status}\n' "$p" 2>/dev/null | grep -q '^install ok installed$' || missing+=("$p")
done
if [ "$fresh" = 1 ] || [ "${#missing[@]}" -gt 0 ] || ! apt-cache showsrc kubernetes >/dev/null 2>&1; then
    $APT update -qq
fi
if [ "${#missing[@]}" -gt 0 ]; then
    $APT install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
apt-cache showsrc kubernetes 2>/dev/null | grep -q '^Version:' || die "apt knows no source package kubernetes"
