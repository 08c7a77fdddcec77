//! CPU state, per architecture. Each architecture is one folder with the same file names
//! (`regs.rs` for the general registers, `xstate.rs` for the extended state), so a port is a
//! new folder. Only x86-64 exists so far.

#[cfg(target_arch = "x86_64")]
pub mod x86_64;
#[cfg(target_arch = "x86_64")]
pub use self::x86_64 as native;

#[cfg(not(target_arch = "x86_64"))]
compile_error!("telefork's engine supports x86-64 only so far (aarch64 is planned)");
