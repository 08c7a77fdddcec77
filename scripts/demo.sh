#!/usr/bin/env bash
# The telefork demo, from a fresh clone (as root):
#  1. three nodes on this machine (network, UTS and mount namespaces, a daemon each, mutual
#     TLS with certificates made for the occasion);
#  2. a program on node1 teleforks a child to node2 that computes on the memory it brought,
#     asks node3 for a value with `remote`, and yo-yos to node2 and back;
#  3. checkpoint/restore of a running counter (scripts/demo-checkpoint.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
echo "== building telefork (release)"
cargo build --release --quiet --workspace --bins --examples
tf="$PWD/target/release/telefork"
trap '"$tf" testbed down >/dev/null 2>&1 || true' EXIT

echo "== telefork testbed up --nodes 3"
"$tf" testbed up --nodes 3
# The demo runs as an ordinary user, who may not be able to reach into this checkout: run
# a copy from the testbed's own directory.
install -m 0755 target/release/examples/demo /run/telefork-testbed/demo
echo "== on node1, as user tfdemo (nodes run nobody's processes as root): demo node2 node3"
"$tf" testbed exec node1 --user tfdemo -- /run/telefork-testbed/demo node2 node3
echo "== telefork testbed down"
"$tf" testbed down
trap - EXIT

echo
bash scripts/demo-checkpoint.sh
