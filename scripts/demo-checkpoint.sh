#!/usr/bin/env bash
# Demo: a counter is captured while it runs, restored from the image, and carries on counting
# from where it was. Builds everything it needs; works from a fresh clone (as root).
set -euo pipefail
cd "$(dirname "$0")/.."

command -v gcc >/dev/null 2>&1 || { echo "demo: gcc is missing: run 'bash scripts/setup.sh'" >&2; exit 1; }
echo "== building telefork (release)"
cargo build --release --quiet --workspace
tf="$PWD/target/release/telefork"
work="$(mktemp -d /tmp/telefork-demo.XXXXXX)"
pid="" newpid=""
cleanup() {
    for p in $pid $newpid; do kill -9 "$p" 2>/dev/null || true; done
    rm -rf "$work"
}
trap cleanup EXIT
gcc -O1 -o "$work/counter" scripts/demo_counter.c

echo "== starting a counter (prints every 100 ms)"
# The prefixing sed is this shell's child, not the counter's: a process with children is not
# captured alone (dump refuses it, naming them).
exec 3> >(sed -u 's/^/   original: /')
"$work/counter" >&3 3>&- &
exec 3>&-
pid=$!
disown "$pid"   # no job-control chatter when it is killed
sleep 1.05

echo "== telefork dump --pid $pid --out counter.img"
"$tf" dump --pid "$pid" --out "$work/counter.img"
for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done   # dump killed it
pid=""
echo "   image: $(du -h --apparent-size "$work/counter.img" | cut -f1) ($(stat -c %s "$work/counter.img") bytes); the counter is gone"
sleep 0.5

echo "== telefork restore counter.img --detach"
"$tf" restore "$work/counter.img" --detach >> "$work/restored.out"
newpid="$(grep -E '^[0-9]+$' "$work/restored.out" | tail -n 1)"
echo "   restored as PID $newpid; it carries on counting:"
sleep 1.05
kill -9 "$newpid"
newpid=""
grep -v -E '^[0-9]+$' "$work/restored.out" | sed 's/^/   restored: /'
echo "== done: the restored counter went on from where the original stopped (killed it)"
