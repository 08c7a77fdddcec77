//! The one interface every kind of process state implements (`State`): its part of the
//! image, what it is captured from, and how it is put back. `capture` and `restore` are the
//! order of steps over these kinds; each kind's module owns its state — where it is read,
//! which calls set it, what it checks — and the memory layout and contents, the page path,
//! travel on their own route (`mem`).

use anyhow::Result;
use nix::unistd::Pid;
use telefork_image::ProcessImage;

use crate::inject::Injector;
use crate::procfs::{Stat, Status};

/// What the capture read of a stopped process from outside, for the kinds whose state
/// /proc shows: its stat and status (each read once, for all of them).
#[derive(Clone, Copy)]
pub(crate) struct Proc<'a> {
    pub pid: Pid,
    pub stat: &'a Stat,
    pub status: &'a Status,
}

/// One kind of process state.
pub(crate) trait State {
    /// Its part of the image, as the capture makes it.
    type Image;
    /// What it is captured from: /proc (`Proc`), or the process itself after the capture's
    /// batch of injected reads, with what those reads left.
    type Source<'a>;

    /// Captures it (the process is stopped; nothing of it is changed).
    fn capture(from: Self::Source<'_>) -> Result<Self::Image>;

    /// Puts its part of `img` back into the process being restored, by calls injected now
    /// or deferred to share the next batch's round trip.
    fn restore(inj: &mut Injector, img: &ProcessImage) -> Result<()>;
}
