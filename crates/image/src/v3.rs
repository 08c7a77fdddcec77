//! The process record as format versions 2 and 3 wrote it, read into today's model: before
//! version 4 there were no timers, process attributes, file locks or mapping flags beyond
//! the advice, so each gets the value that means "as a new process has it".

use serde::Deserialize;

use crate::model::{
    Attrs, Creds, Fd, MmFields, ProcessImage, SigAction, SigInfo, ThreadState, Timers, Vma,
    VmaFlags, VmaKind,
};

/// `ProcessImage` of versions 2 and 3 (the same fields in the same order, without the
/// timers, attributes and locks at the end).
#[derive(Deserialize)]
pub(crate) struct ProcessImageV3 {
    pid: i32,
    comm: String,
    creds: CredsV3,
    misc: crate::model::Misc,
    mm: MmFields,
    vmas: Vec<VmaV3>,
    threads: Vec<ThreadState>,
    sigactions: Vec<SigAction>,
    shared_pending: Vec<SigInfo>,
    fds: Vec<Fd>,
}

/// `Creds` of versions 2 and 3 (without `caps`).
#[derive(Deserialize)]
struct CredsV3 {
    uid: [u32; 4],
    gid: [u32; 4],
    groups: Vec<u32>,
}

/// `Vma` of versions 2 and 3 (without `flags`).
#[derive(Deserialize)]
struct VmaV3 {
    start: u64,
    end: u64,
    prot: u32,
    shared: bool,
    offset: u64,
    kind: VmaKind,
    growsdown: bool,
    accounted: bool,
    advice: Vec<i32>,
}

impl From<ProcessImageV3> for ProcessImage {
    fn from(p: ProcessImageV3) -> ProcessImage {
        ProcessImage {
            pid: p.pid,
            comm: p.comm,
            creds: Creds { uid: p.creds.uid, gid: p.creds.gid, groups: p.creds.groups, caps: None },
            misc: p.misc,
            mm: p.mm,
            vmas: p.vmas.into_iter().map(Vma::from).collect(),
            threads: p.threads,
            sigactions: p.sigactions,
            shared_pending: p.shared_pending,
            fds: p.fds,
            timers: Timers::default(),
            attrs: Attrs::default(),
            locks: Vec::new(),
        }
    }
}

impl From<VmaV3> for Vma {
    fn from(v: VmaV3) -> Vma {
        Vma {
            start: v.start,
            end: v.end,
            prot: v.prot,
            shared: v.shared,
            offset: v.offset,
            kind: v.kind,
            growsdown: v.growsdown,
            accounted: v.accounted,
            advice: v.advice,
            flags: VmaFlags::default(),
        }
    }
}
