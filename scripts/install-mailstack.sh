#!/usr/bin/env bash
# Install the local mail stack that emailmw.devserver runs (Dovecot + Postfix + openssl).
# Idempotent: does nothing when everything is there. Debian/Ubuntu; needs root.
set -euo pipefail

packages=(dovecot-imapd dovecot-lmtpd postfix openssl)
binaries=(/usr/sbin/dovecot /usr/bin/doveadm /usr/lib/dovecot/lmtp /usr/lib/dovecot/imap
          /usr/sbin/postfix /usr/lib/postfix/sbin/master /usr/bin/openssl)

missing=()
for binary in "${binaries[@]}"; do
    [[ -x "$binary" ]] || missing+=("$binary")
done
if [[ ${#missing[@]} -eq 0 ]]; then
    echo "mail stack already installed"
    exit 0
fi

command="apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y ${packages[*]}"
if [[ $(id -u) -ne 0 ]]; then
    echo "missing: ${missing[*]}" >&2
    echo "run as root: $command" >&2
    exit 1
fi

echo "installing ${packages[*]} (missing: ${missing[*]})"
apt-get update
# Keep the packages' own daemons from starting (we run private instances only).
policy=/usr/sbin/policy-rc.d
created_policy=0
if [[ ! -e $policy ]]; then
    printf '#!/bin/sh\nexit 101\n' > "$policy"
    chmod 755 "$policy"
    created_policy=1
fi
trap '[[ $created_policy -eq 1 ]] && rm -f "$policy"' EXIT
DEBIAN_FRONTEND=noninteractive apt-get install -y "${packages[@]}"

for binary in "${binaries[@]}"; do
    [[ -x "$binary" ]] || { echo "still missing after install: $binary" >&2; exit 1; }
done
echo "mail stack installed"
