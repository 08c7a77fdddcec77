//! Placing the pages: the image's page records go into the new process's memory, created by
//! `layout::create` and still writable. One entry, `place`, takes the `Placement` the caller
//! chose and decides, for this image on this kernel, what helps it along:
//!
//! * the restorer writes every record in (`write`): read from the image here, then copied in
//!   with process_vm_writev, or through /proc/PID/mem where the mapping is not writable yet;
//! * the new process receives its own pages off the image's socket (`self_receive`,
//!   `Placement::SelfReceive`), where the image has a page index and the socket can be passed
//!   (else the restorer writes them);
//! * a userfaultfd of the new process (`uffd`) allocates and fills fresh anonymous memory in
//!   one pass, for memory big enough (`RemoteUffd::plan`, opened ahead by `Placer::open`);
//! * huge pages (`huge`) back the fully carried blocks of a big image before their pages
//!   arrive (`HugeBlocks::plan`).
//!
//! A new way in (memory that arrives lazily, after the process runs) is a new `Placement` and
//! a file of its own here.

mod huge;
mod self_receive;
mod uffd;
mod write;

use std::io::Read;

use anyhow::Result;
use telefork_image::{ImageReader, Vma, VmaKind};

use crate::inject::Injector;
use crate::pages::layout::check_page_run;
use huge::HugeBlocks;
pub use self_receive::PagesSocket;
use uffd::RemoteUffd;

/// How the image's pages reach the new process.
#[derive(Debug, Clone, Copy)]
pub enum Placement<'a> {
    /// The restorer reads every page record and writes it in.
    Write,
    /// The image arrives unbuffered on this socket with a page index (the plain transport):
    /// the new process receives its pages from it itself.
    SelfReceive(&'a PagesSocket<'a>),
}

/// What placing the pages needs from the process before its limits are in place: its
/// userfaultfd, where one is used (a low RLIMIT_NOFILE would refuse it later).
pub struct Placer {
    uffd: Option<RemoteUffd>,
}

impl Placer {
    /// Prepares the placing of `vmas`' pages in the process `inj` controls (after
    /// `layout::create`).
    pub fn open(inj: &mut Injector, vmas: &[Vma]) -> Result<Placer> {
        Ok(Placer { uffd: RemoteUffd::plan(inj, vmas)? })
    }
}

/// How a restore's pages were placed.
#[derive(Debug, Clone, Copy, Default)]
pub struct Placed {
    /// Page bytes written.
    pub bytes: u64,
    /// Of those, placed through the process's userfaultfd (or received into memory it populated).
    pub by_uffd: u64,
    /// Bytes in blocks made huge pages before their pages came (`huge`).
    pub in_huge_pages: u64,
    /// The process received its pages itself (`self_receive`).
    pub by_process: bool,
}

/// Whether the image's private memory is big enough to want both CPUs and a reader thread
/// while it is placed (more than 64 MiB of anonymous mappings).
pub fn is_big(vmas: &[Vma]) -> bool {
    vmas.iter().filter(|v| v.kind == VmaKind::Anon).map(|v| v.end - v.start).sum::<u64>() > 64 << 20
}

/// Places the image's page records, all of them (up to the image's trailer), into the
/// process `inj` controls, the way `how` says. `big`: see `is_big`. Returns how they were
/// placed.
pub fn place<R: Read + Send>(
    inj: &mut Injector,
    vmas: &[Vma],
    big: bool,
    reader: &mut ImageReader<R>,
    placer: Placer,
    how: Placement,
) -> Result<Placed> {
    let Placer { uffd } = placer;
    if let Placement::SelfReceive(socket) = how {
        if let Some(handed) = self_receive::hand_over(inj, vmas, reader, socket)? {
            let (bytes, by_uffd) = self_receive::receive(inj, vmas, big, reader, handed, uffd)?;
            return Ok(Placed { bytes, by_uffd, in_huge_pages: 0, by_process: true });
        }
    }
    // A big image's fully carried huge-page blocks are made huge pages ahead of their pages
    // (by a thread of their own, while `write` places them).
    let index = if big { reader.page_index_once()? } else { None };
    let huge = match index {
        Some(index) => {
            // (The reader checked the index's order; where its records go is checked here,
            // as each record will be.)
            for &(addr, len) in index {
                check_page_run(vmas, addr, len)?;
            }
            HugeBlocks::plan(inj.pid(), vmas, index)
        }
        None => None,
    };
    let (bytes, by_uffd) = write::fill(inj, vmas, big, reader, uffd, huge.as_ref())?;
    if let Some(why) = huge.as_ref().and_then(|h| h.stopped_because()) {
        crate::timeline::stamp(&format!("huge pages stopped: {why}"));
    }
    Ok(Placed {
        bytes,
        by_uffd,
        in_huge_pages: huge.map_or(0, |h| h.huge_bytes()),
        by_process: false,
    })
}
