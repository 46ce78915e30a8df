#!/usr/bin/env bash
# Check tools/install.sh's chromium step on a clean Debian root.
#
# Builds a minimal Debian bookworm root with debootstrap (as root; about
# 300 MB), runs the chromium block of tools/install.sh inside it with
# chroot, then renders a local page with the installed chromium in the
# headless mode the browser tests use. Prints "clean root: chromium works"
# and exits 0 on success.
#
#   sudo bash tools/check_clean_root_chromium.sh [ROOT_FOLDER]
#
# ROOT_FOLDER defaults to /tmp/blspkd-clean-root (kept, so a second run
# reuses it; delete it for a fresh check).
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
root=${1:-/tmp/blspkd-clean-root}
[ "$(id -u)" = 0 ] || { echo "run as root (debootstrap, chroot)" >&2; exit 2; }
command -v debootstrap >/dev/null \
  || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null
[ -x "$root/bin/bash" ] \
  || debootstrap --variant=minbase bookworm "$root" http://deb.debian.org/debian
if chroot "$root" sh -c 'command -v chromium' >/dev/null 2>&1; then
  echo "note: $root already has chromium (a previous run); delete it for a fresh check"
fi
# the chromium block of tools/install.sh, as it is in this checkout
sed -n '/# Debian.s chromium for the browser demo/,/^  fi$/p' \
  "$here/tools/install.sh" > "$root/tmp/chromium_step.sh"
[ -s "$root/tmp/chromium_step.sh" ] \
  || { echo "the chromium block was not found in tools/install.sh" >&2; exit 1; }
mountpoint -q "$root/proc" || mount -t proc proc "$root/proc"
trap 'umount "$root/proc" 2>/dev/null || true' EXIT
chroot "$root" bash -c 'set -euo pipefail; source /tmp/chromium_step.sh; chromium --version'
echo '<html><body><h1>clean root page</h1></body></html>' > "$root/tmp/page.html"
dom=$(chroot "$root" chromium --headless --no-sandbox --disable-gpu \
  --disable-quic --no-first-run --disable-background-networking \
  --disable-component-update --disable-sync --user-data-dir=/tmp/chromium-profile \
  --dump-dom file:///tmp/page.html 2>/dev/null)
grep -q "clean root page" <<<"$dom" \
  || { echo "chromium did not render the page" >&2; exit 1; }
echo "clean root: chromium works"
