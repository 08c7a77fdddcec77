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
            Uncarried::Threads { count } => {
                write!(f, "{count} threads: only single-threaded processes can be carried so far")
            }
            Uncarried::State { what, why } => write!(f, "{what}: {why}"),
        }
    }
}

impl std::error::Error for Uncarried {}

/// A refusal of a piece of state that cannot travel, as the root of an error chain: `what`
/// (the thing, named), `why`.
pub(crate) fn refusal(what: String, why: &str) -> anyhow::Error {
    Uncarried::State { what, why: why.to_string() }.into()
}

/// The article before a kind's name ("a socket", "an eventfd").
pub(crate) fn article(kind: &str) -> &'static str {
    match kind.as_bytes().first() {
        Some(b'a' | b'e' | b'i' | b'o') => "an",
        Some(b'u') if kind.starts_with("unknown") => "an",
        _ => "a",
    }
}

/// Why an engine call failed. It reads (`Display`, `source`) exactly as the chain of what
/// the engine was doing, outermost first; a caller that wants more than the text matches
/// the variant, or takes the chain back (`into_chain`) to look for its own errors in it.
#[derive(Debug)]
pub enum Error {
    /// The process (or image) holds state the engine cannot carry; nothing was changed.
    CannotCarry {
        /// The piece of state.
        what: Uncarried,
        /// The whole chain, outermost context first, for the log.
        chain: anyhow::Error,
    },
    /// Anything else: a system call, the image, the input or output.
    Failed(anyhow::Error),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // (`{:#}` shows the whole chain, as anyhow's does.)
        fmt::Display::fmt(self.chain(), f)
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.chain().source()
    }
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

    /// The refusal of an image that asks for more than its owner could have had, if that is
    /// why a restore failed.
    pub fn beyond_owner(&self) -> Option<&crate::BeyondOwner> {
        self.chain().downcast_ref()
    }

    /// The chain of what the engine was doing, outermost first.
    pub fn chain(&self) -> &anyhow::Error {
        match self {
            Error::CannotCarry { chain, .. } | Error::Failed(chain) => chain,
        }
    }

    /// The chain itself, with every error in it (a caller's own, from a closure it gave the
    /// engine, included) still there to `downcast_ref`.
    pub fn into_chain(self) -> anyhow::Error {
        match self {
            Error::CannotCarry { chain, .. } | Error::Failed(chain) => chain,
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
        assert_eq!(
            format!("{e:#}"),
            "capturing process 42: 3 threads: only single-threaded processes can be carried so far"
        );
        let plain: Error = anyhow::anyhow!("read failed").context("capturing").into();
        assert!(plain.uncarried().is_none());
        assert_eq!(format!("{plain}"), "capturing");
        assert_eq!(anyhow::Error::new(plain).chain().count(), 2, "read as its chain");
    }
}
