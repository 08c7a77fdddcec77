//! The testbed's network, built with `ip` (iproute2) run as a subprocess: one bridge
//! `{prefix}br0` in the root namespace (address SUBNET.254/24), and per node K a network
//! namespace `{prefix}nodeK` joined to the bridge by a veth pair `{prefix}vK` (root side,
//! enslaved to the bridge) / `eth0` (namespace side, address SUBNET.K/24), with `lo` up.
//!
//! Removal only ever touches names matching exactly `{prefix}br0`, `{prefix}vN` and
//! `{prefix}nodeN` (N decimal), never anything else.

use std::net::Ipv4Addr;
use std::process::Command;

use anyhow::{bail, Context, Result};

/// Runs `ip ARGS`; on failure the error names the full command line and its stderr.
pub fn ip(args: &[&str]) -> Result<String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .with_context(|| format!("running `ip {}` (is iproute2 installed?)", args.join(" ")))?;
    if !out.status.success() {
        bail!(
            "`ip {}` failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

pub fn bridge_name(prefix: &str) -> String {
    format!("{prefix}br0")
}

pub fn veth_name(prefix: &str, k: usize) -> String {
    format!("{prefix}v{k}")
}

pub fn netns_name(prefix: &str, k: usize) -> String {
    format!("{prefix}node{k}")
}

/// The address of node K (1-based) or of the bridge (K = 254) in `subnet` (a /24 base).
pub fn host_addr(subnet: Ipv4Addr, k: usize) -> Ipv4Addr {
    let o = subnet.octets();
    Ipv4Addr::new(o[0], o[1], o[2], k as u8)
}

/// `NAME` is `{prefix}{stem}N` with N a decimal number.
fn is_numbered(name: &str, prefix: &str, stem: &str) -> bool {
    match name.strip_prefix(prefix).and_then(|r| r.strip_prefix(stem)) {
        Some(n) => !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()),
        None => false,
    }
}

pub fn create_bridge(prefix: &str, subnet: Ipv4Addr) -> Result<()> {
    let br = bridge_name(prefix);
    ip(&["link", "add", &br, "type", "bridge"])?;
    ip(&["addr", "add", &format!("{}/24", host_addr(subnet, 254)), "dev", &br])?;
    ip(&["link", "set", &br, "up"])?;
    Ok(())
}

pub fn create_node_net(prefix: &str, subnet: Ipv4Addr, k: usize) -> Result<()> {
    let ns = netns_name(prefix, k);
    let veth = veth_name(prefix, k);
    ip(&["netns", "add", &ns])?;
    ip(&["link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", &ns])?;
    ip(&["link", "set", &veth, "master", &bridge_name(prefix), "up"])?;
    ip(&["-n", &ns, "addr", "add", &format!("{}/24", host_addr(subnet, k)), "dev", "eth0"])?;
    ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
    ip(&["-n", &ns, "link", "set", "lo", "up"])?;
    Ok(())
}

/// Our network namespaces that exist now (`{prefix}nodeN`).
pub fn list_netns(prefix: &str) -> Result<Vec<String>> {
    let out = ip(&["netns", "list"])?;
    Ok(out
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| is_numbered(n, prefix, "node"))
        .map(String::from)
        .collect())
}

/// PIDs of the processes inside network namespace `ns`.
pub fn netns_pids(ns: &str) -> Result<Vec<i32>> {
    let out = ip(&["netns", "pids", ns])?;
    Ok(out.split_whitespace().filter_map(|p| p.parse().ok()).collect())
}

/// Our links in the root namespace that exist now (`{prefix}br0`, `{prefix}vN`).
pub fn list_links(prefix: &str) -> Result<Vec<String>> {
    let out = ip(&["-o", "link", "show"])?;
    let br = bridge_name(prefix);
    Ok(out
        .lines()
        .filter_map(|l| l.split(": ").nth(1))
        .map(|n| n.split('@').next().unwrap_or(n))
        .filter(|n| *n == br || is_numbered(n, prefix, "v"))
        .map(String::from)
        .collect())
}

pub fn delete_netns(ns: &str) -> Result<()> {
    ip(&["netns", "del", ns]).map(|_| ())
}

/// Deletes a link; one that vanished meanwhile (a veth goes with its namespace) is fine.
pub fn delete_link(name: &str) -> Result<()> {
    match ip(&["link", "del", name]) {
        Ok(_) => Ok(()),
        Err(e)
            if e.to_string().contains("Cannot find device")
                || e.to_string().contains("does not exist") =>
        {
            Ok(())
        }
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(is_numbered("tf-node12", "tf-", "node"));
        assert!(!is_numbered("tf-node", "tf-", "node"));
        assert!(!is_numbered("tf-node1x", "tf-", "node"));
        assert!(!is_numbered("tfx-node1", "tf-", "node"));
        assert!(is_numbered("tf-v3", "tf-", "v"));
        assert!(!is_numbered("tf-veth3", "tf-", "v"));
        assert_eq!(host_addr("10.77.0.0".parse().unwrap(), 254).to_string(), "10.77.0.254");
    }
}
