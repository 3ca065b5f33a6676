#!/usr/bin/env bash
# Debian packages the test suite needs: Chromium for the browser tests (and a colour
# emoji font, so that reactions in their screenshots are not boxes), redis-server
# for the Redis backend, strace for the syscall fault-injection tests.
# Installs only what is missing; needs root (or sudo) when something is.
set -euo pipefail
packages=()
command -v chromium >/dev/null 2>&1 || packages+=(chromium)
command -v redis-server >/dev/null 2>&1 || packages+=(redis-server)
command -v strace >/dev/null 2>&1 || packages+=(strace)
[ -e /usr/share/fonts/truetype/noto/NotoColorEmoji.ttf ] || packages+=(fonts-noto-color-emoji)
if [ ${#packages[@]} -eq 0 ]; then
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "system-deps: please install: ${packages[*]}" >&2
    exit 1
fi
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
echo "system-deps: installing ${packages[*]}" >&2
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${packages[@]}" >/dev/null
