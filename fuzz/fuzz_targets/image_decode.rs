//! Any byte string given to the image reader yields Ok or Err, never a panic, an abort or an
//! unbounded allocation.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok((header, process, pages)) = telefork_image::verify_image(data) {
        // whatever was accepted must be self-consistent
        assert!(pages <= data.len() as u64);
        let _ = (header, process);
    }
});
