#!/bin/bash
# Fetches criu and the libraries it needs from Debian 13 (trixie) into /opt/criu-trixie,
# without touching the system's packages or apt state (apt runs with a configuration, lists,
# cache and package status of its own under a temporary directory — none of the system's
# apt.conf.d hooks — and the packages are only unpacked), and makes /opt/criu-trixie/bin/criu,
# which runs it with trixie's own loader and libraries. For `telefork bench --against-criu`:
#
#     bash scripts/criu-from-debian.sh
#     PATH=/opt/criu-trixie/bin:$PATH telefork bench --against-criu
#
# Why: the criu of this machine's Debian 12 (3.17.1) fails `criu check` on its 6.18 kernel
# ("vdso: Unexpected rt vDSO area bounds"); trixie's 4.1.1 passes it there. It needs
# a newer glibc than Debian 12's, hence the private loader. x86_64 only; needs root (criu
# does) and the Debian package mirror. An earlier install is replaced only by one that passes
# `criu check`.
set -euo pipefail
DEST=${CRIU_DIR:-/opt/criu-trixie}
SUITE=${CRIU_SUITE:-trixie}
if [ "$(uname -m)" != x86_64 ]; then
  echo "criu-from-debian: x86_64 only (this is $(uname -m))" >&2
  exit 1
fi
work=$(mktemp -d)
trap 'rm -rf "$work" "$DEST.new"' EXIT
mkdir -p "$work/lists/partial" "$work/cache/archives/partial" "$work/parts" "$work/prefs"
touch "$work/status" "$work/extended_states"
echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian $SUITE main" > "$work/sources.list"
cat > "$work/apt.conf" <<CONF
Dir::Etc::main "$work/apt.conf";
Dir::Etc::parts "$work/parts";
Dir::Etc::sourcelist "$work/sources.list";
Dir::Etc::sourceparts "$work/parts";
Dir::Etc::preferences "$work/prefs/none";
Dir::Etc::preferencesparts "$work/prefs";
Dir::State::Lists "$work/lists";
Dir::State::status "$work/status";
Dir::State::extended_states "$work/extended_states";
Dir::Cache "$work/cache";
APT::Install-Recommends "0";
APT::Get::List-Cleanup "0";
APT::Sandbox::User "root";
CONF
export APT_CONFIG="$work/apt.conf"
echo "criu-from-debian: reading Debian $SUITE's package lists"
apt-get -q update >/dev/null
echo "criu-from-debian: downloading criu and what it needs"
apt-get -q install --download-only -y criu >/dev/null
debs=("$work"/cache/archives/*.deb)
if [ ! -e "${debs[0]}" ]; then
  echo "criu-from-debian: apt downloaded no packages" >&2
  exit 1
fi
rm -rf "$DEST.new"
mkdir -p "$DEST.new/bin"
for deb in "${debs[@]}"; do
  dpkg-deb -x "$deb" "$DEST.new"
done
# (Relative to itself: checked before it replaces an earlier install.)
cat > "$DEST.new/bin/criu" <<'WRAP'
#!/bin/sh
# criu from Debian with its own loader and libraries (scripts/criu-from-debian.sh).
R=$(dirname "$(readlink -f "$0")")/..
L=$R/usr/lib/x86_64-linux-gnu
exec "$L/ld-linux-x86-64.so.2" --library-path "$L" "$R/usr/sbin/criu" "$@"
WRAP
chmod 755 "$DEST.new/bin/criu"
"$DEST.new/bin/criu" --version
if ! "$DEST.new/bin/criu" check; then
  echo "criu-from-debian: \`criu check\` fails on this kernel (above); $DEST left as it was" >&2
  exit 1
fi
rm -rf "$DEST"
mv "$DEST.new" "$DEST"
echo "criu-from-debian: ready: PATH=$DEST/bin:\$PATH telefork bench --against-criu"
