#!/usr/bin/env bash
# The one test command: setup, the hygiene checks (format, clippy, rustdoc), release build,
# the whole workspace's tests (zdtm suite included, serially: they dump and restore real
# processes), then the three fuzz targets (image, local protocol, node protocol) for
# FUZZ_SECONDS each (default 30). FUZZ_SECONDS=0 skips them.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/setup.sh

# Hygiene, before anything is built for the tests. Each check runs even when one before it
# failed, so one run shows everything that is wrong; any failure stops the command here.
hygiene_failed=()
hygiene() {
    echo "== $*"
    "$@" || hygiene_failed+=("$*")
}
# One style (rustfmt.toml) everywhere, so that a diff shows only what changed; the fuzz crate
# is a workspace of its own and is checked apart.
hygiene cargo fmt --all --check
hygiene bash -c 'cd fuzz && cargo fmt --check'
# clippy's warnings as errors, every target (tests and examples are code too), among them the
# workspace lint that every unsafe block says why it is sound (Cargo.toml); --release: the
# profile the tests are built with; --keep-going: every crate that can be checked is, past a
# failing one.
hygiene cargo clippy --workspace --all-targets --release --keep-going -- -D warnings
# The docs build without a warning: a broken intra-doc link is a wrong statement about the
# code, and the library's docs are its users' manual.
hygiene env RUSTDOCFLAGS="-D warnings" cargo doc --no-deps --workspace --keep-going
if ((${#hygiene_failed[@]})); then
    printf '== hygiene FAILED: %s\n' "${hygiene_failed[@]}" >&2
    exit 1
fi

echo "== build (release)"
# The examples and every binary too: tests run them (crates/cli/tests/cluster.rs runs the
# probe example on testbed nodes; crates/cli/tests/bench.rs runs telefork-bench and benchprog,
# binaries of crates/bench, which a test of the CLI does not build).
cargo build --release --workspace --bins --examples

echo "== tests"
# --no-fail-fast: every test binary runs and reports, even after one fails
status=0
cargo test --workspace --release --no-fail-fast -- --test-threads=1 || status=$?

# The fuzz targets, each for FUZZ_SECONDS, from seeds written by the examples: a valid image
# (image_decode), valid message streams and record recipes (local_protocol, node_protocol).
fuzz_seconds="${FUZZ_SECONDS:-30}"
fuzz_targets=(image_decode local_protocol node_protocol)
fuzz_failed=()
if [ "$fuzz_seconds" -gt 0 ]; then
    for target in "${fuzz_targets[@]}"; do
        mkdir -p "fuzz/corpus/$target"
        rm -rf "fuzz/artifacts/$target"
    done
    cargo run --quiet --release -p telefork-image --example sample_image -- fuzz/corpus/image_decode/sample
    cargo run --quiet --release -p telefork-node --example fuzz_seeds -- fuzz/corpus
    # cargo-fuzz needs nightly-only flags; RUSTC_BOOTSTRAP lets this stable toolchain take them.
    # (All targets built at once: the time below is the fuzzing's own.)
    (cd fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz build --release)
    for target in "${fuzz_targets[@]}"; do
        echo "== fuzz $target for ${fuzz_seconds} s"
        fuzz_status=0
        (cd fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz run "$target" --release "corpus/$target" -- \
            -max_total_time="$fuzz_seconds" -print_final_stats=1 2>&1 | tail -n 20) || fuzz_status=$?
        # (pipefail keeps the fuzzer's exit status; the artifacts say what it found)
        if [ "$fuzz_status" -ne 0 ] || compgen -G "fuzz/artifacts/$target/*" >/dev/null; then
            echo "fuzz: $target failed (exit status $fuzz_status); crashing inputs:" >&2
            ls -l "fuzz/artifacts/$target" >&2 || true
            fuzz_failed+=("$target")
        fi
    done
fi
if ((${#fuzz_failed[@]})); then
    echo "== fuzz FAILED: ${fuzz_failed[*]}" >&2
fi
if [ "$status" -ne 0 ]; then
    echo "== tests FAILED (cargo test exit status $status)" >&2
    exit "$status"
fi
if ((${#fuzz_failed[@]})); then
    exit 1
fi
echo "== all tests passed"
