#!/usr/bin/env bash
# The one test command: setup, release build, the whole workspace's tests (zdtm suite
# included, serially: they dump and restore real processes), then the image fuzzer for a
# bounded time. FUZZ_SECONDS=0 skips the fuzzer.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/setup.sh

echo "== build (release)"
cargo build --release --workspace
# the examples too: tests run them on testbed nodes (crates/cli/tests/cluster.rs: probe)
cargo build --release --workspace --examples

echo "== tests"
# --no-fail-fast: every test binary runs and reports, even after one fails
status=0
cargo test --workspace --release --no-fail-fast -- --test-threads=1 || status=$?

fuzz_seconds="${FUZZ_SECONDS:-60}"
if [ "$fuzz_seconds" -gt 0 ]; then
    echo "== fuzz image_decode for ${fuzz_seconds} s"
    corpus=fuzz/corpus/image_decode
    mkdir -p "$corpus"
    rm -rf fuzz/artifacts/image_decode
    cargo run --quiet --release -p telefork-image --example sample_image -- "$corpus/sample"
    # cargo-fuzz needs nightly-only flags; RUSTC_BOOTSTRAP lets this stable toolchain take them.
    (cd fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz run image_decode --release "corpus/image_decode" -- \
        -max_total_time="$fuzz_seconds" -print_final_stats=1 2>&1 | tail -n 20)
    # (pipefail keeps the fuzzer's exit status; the artifacts say what it found)
    if compgen -G "fuzz/artifacts/image_decode/*" >/dev/null; then
        echo "fuzz: image_decode found crashing inputs:" >&2
        ls -l fuzz/artifacts/image_decode >&2
        exit 1
    fi
fi
if [ "$status" -ne 0 ]; then
    echo "== tests FAILED (cargo test exit status $status)" >&2
    exit "$status"
fi
echo "== all tests passed"
