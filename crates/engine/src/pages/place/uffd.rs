//! A userfaultfd of the process being restored, held by the restorer: the way the anonymous
//! memory of a big process is filled (`RemoteUffd::plan` decides).
//!
//! The fd is created inside the stopped process (an injected userfaultfd(2): it belongs to
//! that process's address space) and copied out with pidfd_getfd. The restorer registers the
//! private anonymous mappings and places each page run with UFFDIO_COPY, which allocates the
//! pages and fills them in one pass — where populating (the kernel zeroes every page) and then
//! writing (process_vm_writev) touches every byte twice. Before the process runs, every range
//! is unregistered and the fd closed on both sides: a page the image did not carry is then an
//! ordinary demand-zero page again.
//!
//! The fd is made with UFFD_USER_MODE_ONLY, so an unprivileged restorer may create it and a
//! kernel access to a still-registered missing page fails (EFAULT) instead of waiting for us.
//!
//! Written by hand: the `userfaultfd` crate generates its bindings with bindgen at build time
//! (libclang, absent on our machines) and only creates fds for its own process.

use std::os::fd::{AsFd, AsRawFd, OwnedFd};

use anyhow::{Context, Result};

use telefork_image::{Vma, VmaKind};

use crate::inject::Injector;

const UFFD_API: u64 = 0xAA;
const UFFD_USER_MODE_ONLY: u64 = 1;
const UFFDIO_REGISTER_MODE_MISSING: u64 = 1;
const UFFDIO_COPY_MODE_DONTWAKE: u64 = 1;

#[repr(C)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

#[repr(C)]
struct UffdioRange {
    start: u64,
    len: u64,
}

#[repr(C)]
struct UffdioRegister {
    range: UffdioRange,
    mode: u64,
    ioctls: u64,
}

#[repr(C)]
struct UffdioCopy {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    copy: i64,
}

/// _IOC(dir, 0xAA, nr, size) as the kernel's uapi header defines it (same on x86-64 and arm64).
const fn uffd_ioc(dir: u64, nr: u64, size: usize) -> u64 {
    (dir << 30) | ((size as u64) << 16) | (UFFD_API << 8) | nr
}
const IOC_READ: u64 = 2;
const IOC_RW: u64 = 3;
const UFFDIO_API: u64 = uffd_ioc(IOC_RW, 0x3F, std::mem::size_of::<UffdioApi>());
const UFFDIO_REGISTER: u64 = uffd_ioc(IOC_RW, 0x00, std::mem::size_of::<UffdioRegister>());
const UFFDIO_UNREGISTER: u64 = uffd_ioc(IOC_READ, 0x01, std::mem::size_of::<UffdioRange>());
const UFFDIO_COPY: u64 = uffd_ioc(IOC_RW, 0x03, std::mem::size_of::<UffdioCopy>());

/// Private anonymous memory (address space, not pages) above which restore places pages
/// through userfaultfd (see `RemoteUffd::plan`).
const UFFD_MIN: u64 = 16 << 20;

/// The mappings whose pages are placed through userfaultfd: private anonymous memory (the
/// kernel supports MISSING registration there; private file mappings keep the file's pages).
fn ranges(vmas: &[Vma]) -> Vec<(u64, u64)> {
    vmas.iter()
        .filter(|v| v.kind == VmaKind::Anon && !v.shared)
        .map(|v| (v.start, v.end - v.start))
        .collect()
}

/// The restorer's handle on the new process's userfaultfd, with the ranges registered.
pub struct RemoteUffd {
    fd: OwnedFd,
    registered: Vec<(u64, u64)>,
}

fn ioctl<T>(fd: &OwnedFd, req: u64, arg: &mut T) -> std::io::Result<()> {
    // SAFETY: every request used here takes a pointer to the #[repr(C)] struct `T` the kernel
    // header pairs it with (checked by the size encoded in `req`); it outlives the call.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), req as _, arg as *mut T) };
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

impl RemoteUffd {
    /// The new process's userfaultfd with its private anonymous mappings registered (`None`
    /// where userfaultfd is absent, forbidden or turned off). Opened before the image's
    /// limits are in place (a low RLIMIT_NOFILE would refuse it).
    ///
    /// Only where the private anonymous mappings span more than `UFFD_MIN` (or with
    /// `TELEFORK_USERFAULTFD=always`; never with `=never`): for a small process, opening,
    /// registering and releasing it took ~0.05 ms, more than writing its few pages saves (a
    /// small telefork's restore: 0.61 → 0.57 ms, medians of 180).
    pub fn plan(inj: &mut Injector, vmas: &[Vma]) -> Result<Option<RemoteUffd>> {
        let ranges = ranges(vmas);
        let span: u64 = ranges.iter().map(|(_, len)| len).sum();
        if !crate::never_or_always("TELEFORK_USERFAULTFD").unwrap_or(span > UFFD_MIN) {
            return Ok(None);
        }
        RemoteUffd::open(inj, &ranges)
    }

    /// Creates a userfaultfd in the stopped process and registers `ranges` (private anonymous
    /// mappings, nothing present yet). `None` if the kernel cannot (no userfaultfd, or it is
    /// forbidden): the caller fills memory the older way. (Whether to use one at all is
    /// `plan`'s choice.)
    fn open(inj: &mut Injector, ranges: &[(u64, u64)]) -> Result<Option<RemoteUffd>> {
        let remote_fd = inj.syscall_raw(
            libc::SYS_userfaultfd,
            &[(libc::O_CLOEXEC as u64) | UFFD_USER_MODE_ONLY],
        )?;
        if remote_fd < 0 {
            return Ok(None);
        }
        let fd = take_fd(inj.pid().as_raw(), remote_fd as i32);
        inj.syscall(libc::SYS_close, &[remote_fd as u64], "closing the process's userfaultfd")?;
        let Some(fd) = fd else { return Ok(None) };
        let mut api = UffdioApi { api: UFFD_API, features: 0, ioctls: 0 };
        if ioctl(&fd, UFFDIO_API, &mut api).is_err() {
            return Ok(None);
        }
        let mut uffd = RemoteUffd { fd, registered: Vec::with_capacity(ranges.len()) };
        for &(start, len) in ranges {
            let mut reg = UffdioRegister {
                range: UffdioRange { start, len },
                mode: UFFDIO_REGISTER_MODE_MISSING,
                ioctls: 0,
            };
            ioctl(&uffd.fd, UFFDIO_REGISTER, &mut reg).with_context(|| {
                format!("registering {start:#x}-{:#x} with userfaultfd", start + len)
            })?;
            uffd.registered.push((start, len));
        }
        Ok(Some(uffd))
    }

    /// Whether `[addr, addr+len)` lies in a registered range (where `copy` must be used:
    /// a kernel write to a missing page there fails).
    pub fn covers(&self, addr: u64, len: u64) -> bool {
        self.registered.iter().any(|&(s, l)| s <= addr && addr + len <= s + l)
    }

    /// Places `data` at `addr` in the process: fresh pages, filled in one pass.
    pub fn copy(&self, addr: u64, data: &[u8]) -> Result<()> {
        let mut done = 0usize;
        while done < data.len() {
            let mut c = UffdioCopy {
                dst: addr + done as u64,
                src: data[done..].as_ptr() as u64,
                len: (data.len() - done) as u64,
                mode: UFFDIO_COPY_MODE_DONTWAKE,
                copy: 0,
            };
            match ioctl(&self.fd, UFFDIO_COPY, &mut c) {
                Ok(()) => done += c.copy.max(0) as usize,
                // Interrupted part way: `copy` says how far it got.
                Err(e) if e.raw_os_error() == Some(libc::EAGAIN) && c.copy > 0 => {
                    done += c.copy as usize
                }
                Err(e)
                    if e.raw_os_error() == Some(libc::EAGAIN)
                        || e.raw_os_error() == Some(libc::EINTR) => {}
                Err(e) => {
                    return Err(e).with_context(|| {
                        format!(
                            "placing memory {:#x}-{:#x} into the process",
                            addr + done as u64,
                            addr + data.len() as u64
                        )
                    })
                }
            }
        }
        Ok(())
    }

    /// Stops watching `[start, start+len)`, part of a registered range (`copy` must not be
    /// used there any more; `release` lets go of the rest).
    pub fn unwatch(&self, start: u64, len: u64) -> Result<()> {
        let mut r = UffdioRange { start, len };
        ioctl(&self.fd, UFFDIO_UNREGISTER, &mut r).with_context(|| {
            format!("unregistering {start:#x}-{:#x} from userfaultfd", start + len)
        })
    }

    /// Unregisters every range and closes the fd: from now on the process faults normally.
    pub fn release(self) -> Result<()> {
        for &(start, len) in &self.registered {
            self.unwatch(start, len)?;
        }
        Ok(())
    }
}

/// A copy of fd `target_fd` of process `pid` (pidfd_getfd; we trace it, so we may).
fn take_fd(pid: i32, target_fd: i32) -> Option<OwnedFd> {
    let pidfd = crate::pidfd::open(pid).ok()?;
    crate::pidfd::get_fd(pidfd.as_fd(), target_fd).ok()
}
