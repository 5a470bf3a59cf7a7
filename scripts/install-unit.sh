#!/usr/bin/env bash
# Install netbpf-restore.service (the unit that runs `netbpf restore` at boot) for this checkout.
# Idempotent. Not enabled unless NETBPF_ENABLE_RESTORE=1. NETBPF_UNIT_DIR overrides
# /etc/systemd/system (tests and shared machines use a private one).
set -euo pipefail
cd "$(dirname "$0")/.."
UNIT_DIR=${NETBPF_UNIT_DIR:-/etc/systemd/system}
UNIT=netbpf-restore.service
mkdir -p "$UNIT_DIR"
new=$(sed "s|@NETBPF@|$(pwd)/.venv/bin/netbpf|" "scripts/$UNIT")
if [ ! -f "$UNIT_DIR/$UNIT" ] || [ "$(cat "$UNIT_DIR/$UNIT")" != "$new" ]; then
    printf '%s\n' "$new" > "$UNIT_DIR/$UNIT"
    echo "setup: installed $UNIT_DIR/$UNIT (enable: systemctl enable $UNIT)"
    if [ -z "${NETBPF_UNIT_DIR:-}" ] && [ -d /run/systemd/system ]; then
        systemctl daemon-reload || true
    fi
fi
if [ "${NETBPF_ENABLE_RESTORE:-0}" = 1 ]; then
    # what 'systemctl enable' does, also where systemd is not running (containers, images)
    mkdir -p "$UNIT_DIR/multi-user.target.wants"
    ln -sfn "$UNIT_DIR/$UNIT" "$UNIT_DIR/multi-user.target.wants/$UNIT"
    echo "setup: enabled $UNIT"
fi
