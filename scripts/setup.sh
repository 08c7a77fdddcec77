#!/usr/bin/env bash
# Installs what the build and the tests need, only what is missing. Idempotent; silent when
# everything is already there.
set -euo pipefail

need_apt=()
command -v gcc >/dev/null 2>&1 || need_apt+=(gcc libc6-dev)
command -v g++ >/dev/null 2>&1 || need_apt+=(g++)          # libFuzzer (cargo-fuzz) is C++
command -v python3 >/dev/null 2>&1 || need_apt+=(python3)  # the python3 zdtm target
command -v make >/dev/null 2>&1 || need_apt+=(make)

if ((${#need_apt[@]})); then
    echo "setup: installing ${need_apt[*]}" >&2
    if [ "$(id -u)" -ne 0 ]; then
        echo "setup: need root to apt-get install ${need_apt[*]}" >&2
        exit 1
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null
    apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi

if ! command -v cargo >/dev/null 2>&1; then
    echo "setup: cargo is not installed (a Rust toolchain is required)" >&2
    exit 1
fi

# The test command's hygiene checks (scripts/test.sh).
if ! cargo fmt --version >/dev/null 2>&1 || ! cargo clippy --version >/dev/null 2>&1; then
    if ! command -v rustup >/dev/null 2>&1; then
        echo "setup: cargo fmt and cargo clippy are needed (rustup component add rustfmt clippy)" >&2
        exit 1
    fi
    echo "setup: installing rustfmt and clippy" >&2
    rustup component add rustfmt clippy
fi

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "setup: installing cargo-fuzz" >&2
    cargo install cargo-fuzz --locked --quiet
fi
