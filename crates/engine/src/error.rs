//! What the engine's public calls say when they fail.
//!
//! Inside, the engine works with `anyhow` chains (each layer adds what it was doing). Where it
//! meets state it cannot carry it raises an [`Uncarried`] value as the root of that chain; the
//! public surface turns a chain into an [`Error`] by looking for that root, so a caller can
//! tell "this process holds something we cannot move" (nothing was changed; a different
//! process might work) from "the operation failed" (kernel, I/O, image) by matching, not by
//! reading the message.

use std::fmt;

/// State of a process that the engine cannot carry: capture (or restore) refused it by name
/// before anything was changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Uncarried {
    /// An open file descriptor of a kind the engine does not carry.
    Fd {
        /// The descriptor's number in the process.
        fd: i32,
        /// What it is: "socket", "pipe", "eventfd", … (see `fds::describe_kind`).
        kind: String,
        /// What /proc/PID/fd/N links to.
        target: String,
    },
    /// More threads than the engine carries.
    Threads {
        /// How many threads the process (or image) has.
        count: usize,
    },
    /// Any other piece of state: a mapping, a sandbox, a deleted file the process depends on.
    State {
        /// What it is, e.g. "mapping 0x7f…-0x7f…" or "seccomp filters".
        what: String,
        /// Why it cannot travel.
        why: String,
    },
}

impl fmt::Display for Uncarried {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Uncarried::Fd { fd, kind, target } => {
                write!(f, "fd {fd} is {} {kind} ({target}): not supported yet", article(kind))
            }
            Uncarried::Threads { count } => write!(
                f,
                "{count} threads: only single-threaded processes can be carried so far"
            ),
            Uncarried::State { what, why } => write!(f, "{what}: {why}"),
        }
    }
}

impl std::error::Error for Uncarried {}

/// The article before a kind's name ("a socket", "an eventfd").
pub(crate) fn article(kind: &str) -> &'static str {
    match kind.as_bytes().first() {
        Some(b'a' | b'e' | b'i' | b'o') => "an",
        Some(b'u') if kind.starts_with("unknown") => "an",
        _ => "a",
    }
}

/// Why an engine call failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The process (or image) holds state the engine cannot carry; nothing was changed.
    #[error("cannot carry {what}")]
    CannotCarry {
        /// The piece of state.
        what: Uncarried,
        /// The whole chain, outermost context first, for the log.
        #[source]
        chain: anyhow::Error,
    },
    /// Anything else: a system call, the image, the input or output.
    #[error(transparent)]
    Failed(anyhow::Error),
}

impl From<anyhow::Error> for Error {
    fn from(chain: anyhow::Error) -> Self {
        match chain.downcast_ref::<Uncarried>() {
            Some(what) => Error::CannotCarry { what: what.clone(), chain },
            None => Error::Failed(chain),
        }
    }
}

impl Error {
    /// The piece of state that could not be carried, if that is why it failed.
    pub fn uncarried(&self) -> Option<&Uncarried> {
        match self {
            Error::CannotCarry { what, .. } => Some(what),
            Error::Failed(_) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use anyhow::Context;

    #[test]
    fn an_uncarried_root_survives_context() {
        let root: anyhow::Result<()> = Err(Uncarried::Threads { count: 3 }.into());
        let e: Error = root.context("capturing process 42").unwrap_err().into();
        assert_eq!(e.uncarried(), Some(&Uncarried::Threads { count: 3 }));
        let plain: Error = anyhow::anyhow!("read failed").context("capturing").into();
        assert!(plain.uncarried().is_none());
    }
}
