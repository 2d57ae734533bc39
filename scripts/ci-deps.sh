#!/usr/bin/env bash
# Debian packages the tests, the demo and the bench need. Idempotent.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
# Wait for a dpkg lock held by another apt run instead of failing at once.
APT="apt-get -o DPkg::Lock::Timeout=600"
$APT update -qq
$APT install -y -qq --no-install-recommends \
  iptables nftables iproute2 containernetworking-plugins openssl kmod procps ca-certificates curl >/dev/null
# Manifest validation (scripts/validate-manifests.sh): offline once installed.
python3 -m kubernetes_validate --version >/dev/null 2>&1 || python3 -m pip install --quiet kubernetes-validate
