#!/bin/bash
# Fetches criu and the libraries it needs from Debian 13 (trixie) into /opt/criu-trixie,
# without touching the system's packages (apt runs with a state of its own under a temporary
# directory, and the packages are only unpacked), and makes /opt/criu-trixie/bin/criu, which
# runs it with trixie's own loader and libraries. For `telefork bench --against-criu`:
#
#     bash scripts/criu-from-debian.sh
#     PATH=/opt/criu-trixie/bin:$PATH telefork bench --against-criu
#
# Why: the criu of this machine's Debian 12 (3.17.1) fails `criu check` on 6.x kernels
# ("vdso: Unexpected rt vDSO area bounds"); trixie's 4.1.1 passes it on Linux 6.18. It needs
# a newer glibc than Debian 12's, hence the private loader. Needs root (criu does) and the
# Debian package mirror.
set -euo pipefail
DEST=${CRIU_DIR:-/opt/criu-trixie}
SUITE=${CRIU_SUITE:-trixie}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/lists/partial" "$work/cache/archives/partial"
touch "$work/status"
echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian $SUITE main" > "$work/sources.list"
apt_opts=(-o Dir::Etc::sourcelist="$work/sources.list" -o Dir::Etc::sourceparts=- -o Dir::Etc::preferencesparts=-
  -o Dir::State::Lists="$work/lists" -o Dir::Cache="$work/cache" -o Dir::State::status="$work/status"
  -o APT::Install-Recommends=0 -o APT::Get::List-Cleanup=0 -o APT::Sandbox::User=root -q)
echo "criu-from-debian: reading Debian $SUITE's package lists"
apt-get "${apt_opts[@]}" update >/dev/null
echo "criu-from-debian: downloading criu and what it needs"
apt-get "${apt_opts[@]}" install --download-only -y criu >/dev/null
rm -rf "$DEST.new"
mkdir -p "$DEST.new/bin"
for deb in "$work"/cache/archives/*.deb; do
  dpkg-deb -x "$deb" "$DEST.new"
done
cat > "$DEST.new/bin/criu" <<WRAP
#!/bin/sh
# criu from Debian $SUITE with its own loader and libraries (scripts/criu-from-debian.sh).
L=$DEST/usr/lib/x86_64-linux-gnu
exec "\$L/ld-linux-x86-64.so.2" --library-path "\$L" "$DEST/usr/sbin/criu" "\$@"
WRAP
chmod 755 "$DEST.new/bin/criu"
rm -rf "$DEST"
mv "$DEST.new" "$DEST"
"$DEST/bin/criu" --version
if "$DEST/bin/criu" check; then
  echo "criu-from-debian: ready: PATH=$DEST/bin:\$PATH telefork bench --against-criu"
else
  echo "criu-from-debian: criu is in $DEST but \`criu check\` fails on this kernel (above)" >&2
  exit 1
fi
