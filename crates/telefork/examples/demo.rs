//! The telefork demo: a process sends a child to another node, asks a third node for a value,
//! and yo-yos to a node and back. Run on a testbed node:
//!
//!     telefork testbed up --nodes 3
//!     telefork testbed exec node1 -- target/release/examples/demo node2 node3

fn hostname() -> String {
    nix::unistd::gethostname()
        .map(|h| h.to_string_lossy().into_owned())
        .unwrap_or_else(|_| "?".into())
}

fn main() -> Result<(), telefork::Error> {
    let args: Vec<String> = std::env::args().collect();
    let there = args.get(1).map(String::as_str).unwrap_or("node2");
    let third = args.get(2).map(String::as_str).unwrap_or("node3");

    // Memory the child brings with it: 64 MiB of numbers.
    let numbers: Vec<u64> = (0..8u64 << 20).collect();
    let expected: u64 = numbers.iter().sum();
    println!(
        "[{}] parent: {} MiB of numbers, sum {expected}; teleforking to {there}",
        hostname(),
        (numbers.len() * 8) >> 20
    );

    match telefork::telefork(there)? {
        telefork::Fork::Child => {
            let sum: u64 = numbers.iter().sum();
            println!(
                "[{}] child: pid {}, sum of the numbers I brought = {sum} ({})",
                hostname(),
                std::process::id(),
                if sum == expected { "correct" } else { "WRONG" }
            );
            std::process::exit(if sum == expected { 7 } else { 1 });
        }
        telefork::Fork::Parent(mut child) => {
            println!("[{}] parent: child runs as {}", hostname(), child.id());
            let status = child.wait()?;
            println!("[{}] parent: child exited with {status}", hostname());
        }
    }

    let (host, sum) = telefork::remote(third, || (hostname(), numbers.iter().sum::<u64>()))?;
    println!("[{}] remote({third}) returned ({host:?}, {sum})", hostname());

    let mut visited = String::from("nowhere");
    telefork::yoyo(there, || {
        visited = hostname();
        println!("[{}] yoyo: running here, memory and all", hostname());
    })?;
    println!("[{}] yoyo: back home after visiting {visited}", hostname());
    Ok(())
}
