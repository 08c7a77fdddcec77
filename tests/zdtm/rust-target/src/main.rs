//! zdtm target in Rust: a HashMap, a thread-local and a Box'd buffer, single-threaded at
//! capture (multi-threaded capture is another issue). After restore: the data is intact, the allocator works, and new threads can be spawned.
use std::cell::RefCell;
use std::collections::HashMap;
use std::io::Write;
use std::path::PathBuf;
use std::process::exit;
use std::time::{Duration, Instant};

thread_local! {
    static TLS: RefCell<Vec<u64>> = RefCell::new(Vec::new());
}

fn fail(msg: String) -> ! {
    println!("FAIL: {msg}");
    std::io::stdout().flush().ok();
    exit(1);
}

fn val(i: u64) -> u64 {
    i.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0x1234
}

fn main() {
    let go = PathBuf::from(std::env::var_os("ZDTM_GO").unwrap_or_else(|| fail("ZDTM_GO is not set".into())));
    if go.exists() {
        fail(format!("go file {} exists before capture", go.display()));
    }
    let map: HashMap<String, u64> = (0..50_000u64).map(|i| (format!("k{i}"), val(i))).collect();
    TLS.with(|t| t.borrow_mut().extend((0..10_000u64).map(val)));
    let boxed: Box<[u8]> = (0..(4usize << 20)).map(|i| (i % 253) as u8).collect();
    let t0 = Instant::now();

    println!("READY");
    std::io::stdout().flush().unwrap();
    while !go.exists() {
        std::thread::sleep(Duration::from_millis(1));
    }

    if map.len() != 50_000 {
        fail(format!("HashMap has {} entries", map.len()));
    }
    for i in 0..50_000u64 {
        if map.get(&format!("k{i}")) != Some(&val(i)) {
            fail(format!("HashMap entry k{i} lost or changed"));
        }
    }
    TLS.with(|t| {
        let t = t.borrow();
        if t.len() != 10_000 || t.iter().enumerate().any(|(i, v)| *v != val(i as u64)) {
            fail("thread-local Vec changed".into());
        }
    });
    if boxed.iter().enumerate().any(|(i, b)| *b != (i % 253) as u8) {
        fail("Box<[u8]> contents changed".into());
    }
    if t0.elapsed() > Duration::from_secs(3600) {
        fail("Instant went weird".into());
    }
    // New threads, each with its own thread-local, and the allocator from several threads.
    let hs: Vec<_> = (0..4u64)
        .map(|k| {
            std::thread::spawn(move || {
                TLS.with(|t| t.borrow_mut().push(k));
                let v: Vec<u64> = (0..100_000).map(|i| val(i + k)).collect();
                TLS.with(|t| t.borrow().len()) as u64 + v[99_999] - val(99_999 + k)
            })
        })
        .collect();
    for h in hs {
        match h.join() {
            Ok(1) => {}
            Ok(n) => fail(format!("thread after restore saw a thread-local of length {n}")),
            Err(_) => fail("a thread spawned after restore panicked".into()),
        }
    }
    println!("PASS");
}
