//! `telefork bench --quick --json`, end to end: the bench brings up its own testbed, runs every
//! measurement and its baselines' helper programs (benchprog's sinks, relays, the state moved
//! by hand, the background pause's floor, raw TCP on reno), and reports each promised row with
//! a measured value. A smoke test of the benchmark, not a timed test: no speed is asserted — only that
//! every number was measured (positive and finite) and the run left no testbed behind.
//! Needs root and iproute2 (skipped otherwise).

use std::path::Path;
use std::process::Command;

use telefork_testbed as tb;

/// Rows every quick run must report (by a part of their name), with what they measure.
const PROMISED: [&str; 13] = [
    "call → child's first instruction on node2",
    "round trip: telefork + exit(0) + wait",
    "hand-overs only: relay → node2",
    "state moved by hand: mappings, written pages",
    "round trip (the same), against the state moved by hand",
    "telefork(background) returns",
    "floor: fork + pidfd_open + the request",
    "telefork(background), against that floor",
    "64 GiB reserved, 10 MiB touched",
    "256 MiB telefork until it runs on node2 (TLS)",
    "256 MiB telefork until it runs on node2 (plain)",
    "256 MiB restore from file (until it runs)",
    "256 MiB: extra memory on node1",
];

#[test]
fn quick_bench_measures_every_row() {
    if !tb::can_run() {
        return;
    }
    let bin = env!("CARGO_BIN_EXE_telefork");
    let benchprog = Path::new(bin).parent().unwrap().join("examples").join("benchprog");
    assert!(benchprog.exists(), "{} is missing: run `cargo build --release --examples` first", benchprog.display());
    let out = Command::new(bin).args(["bench", "--quick", "--json"]).output().expect("running telefork bench");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "telefork bench --quick failed ({}):\n{stderr}", out.status);
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("bench --json printed no JSON ({e}):\n{}", String::from_utf8_lossy(&out.stdout)));
    let rows = report["measurements"].as_array().expect("a measurements array");
    for want in PROMISED {
        let row = rows.iter().find(|r| r["name"].as_str().is_some_and(|n| n.contains(want))).unwrap_or_else(|| panic!("no row {want:?} in the report:\n{report:#}"));
        for field in ["value", "baseline", "ratio"] {
            let v = row[field].as_f64().unwrap_or(f64::NAN);
            assert!(v.is_finite() && v > 0.0, "row {want:?}: {field} is {} — not measured:\n{row:#}", row[field]);
        }
    }
    // The nodes' congestion control is named, and raw TCP on reno (the link without pacing)
    // was measured beside the throughput rows unless the nodes are on reno already.
    let machine = report["machine"].as_str().unwrap_or_default();
    let congestion = machine.split("testbed TCP congestion control ").nth(1).unwrap_or_else(|| panic!("the machine line names no congestion control: {machine:?}"));
    if congestion != "reno" {
        let unpaced: Vec<&serde_json::Value> = rows.iter().filter(|r| r["baseline_name"] == "raw TCP plaintext, reno").collect();
        assert_eq!(unpaced.len(), 4, "raw TCP on reno should stand beside the TLS and plain rows of 64 and 256 MiB:\n{report:#}");
        for row in unpaced {
            let v = row["baseline"].as_f64().unwrap_or(f64::NAN);
            assert!(v.is_finite() && v > 0.0, "raw TCP on reno was not measured:\n{row:#}");
        }
    }
    // Every row measured, not only the promised ones.
    for row in rows {
        let v = row["value"].as_f64().unwrap_or(f64::NAN);
        assert!(v.is_finite() && v > 0.0, "row {} was not measured:\n{row:#}", row["name"]);
    }
    // The bench's testbed is gone (its namespaces have the prefix tfb-).
    let netns = Command::new("ip").args(["netns", "list"]).output().expect("ip netns list");
    let left: Vec<String> = String::from_utf8_lossy(&netns.stdout).lines().filter(|l| l.starts_with("tfb-")).map(String::from).collect();
    assert!(left.is_empty(), "the bench left network namespaces behind: {left:?}");
}
