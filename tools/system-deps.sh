#!/usr/bin/env bash
# What the test suite needs from the system, beyond Python packages: Chromium (the report is opened in a real
# headless browser), Debian's Fashion-MNIST files (the Fashion-MNIST studies) and the DejaVu and Liberation fonts
# (the printed digits of digit-collections). Installed with apt when run as
# root; otherwise the exact command is printed and the script fails, so no test is skipped silently.
set -uo pipefail
missing=()
command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || missing+=(chromium)
[ -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] || missing+=(dataset-fashion-mnist)
fonts=${SHIFTBN_FONTS_ROOT:-/usr/share/fonts/truetype}
[ -f $fonts/dejavu/DejaVuSans.ttf ] || missing+=(fonts-dejavu-core)
[ -f $fonts/dejavu/DejaVuSerifCondensed.ttf ] || missing+=(fonts-dejavu-extra)
# The DejaVu Sans Mono faces ship in fonts-dejavu-core up to Debian 12 and in fonts-dejavu-mono from Debian 13.
mono=fonts-dejavu-core
apt-cache show fonts-dejavu-mono >/dev/null 2>&1 && mono=fonts-dejavu-mono
if [ ! -f $fonts/dejavu/DejaVuSansMono.ttf ] && [[ " ${missing[*]} " != *" $mono "* ]]; then missing+=("$mono"); fi
[ -f $fonts/liberation/LiberationSans-Regular.ttf ] || missing+=(fonts-liberation)
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing ${missing[*]} with apt-get (needed by the tests)" >&2
    apt-get install -y -q "${missing[@]}" >/dev/null 2>&1 \
        || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q "${missing[@]}" >/dev/null 2>&1; } \
        || { echo "make test: could not install ${missing[*]}; run: sudo apt-get install ${missing[*]}" >&2; exit 1; }
    exit 0
fi
echo "make test needs ${missing[*]}: run  sudo apt-get install ${missing[*]}  (or SKIP_SYSTEM_DEPS=1 make test to run without; their tests then fail or are reported as skipped)" >&2
exit 1
