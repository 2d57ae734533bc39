#!/usr/bin/env bash
# Debian packages the tests, the demo and the bench need. Idempotent.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends \
  iptables nftables iproute2 containernetworking-plugins openssl kmod procps ca-certificates >/dev/null
