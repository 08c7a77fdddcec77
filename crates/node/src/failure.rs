//! From the daemon's error chains (anyhow) to the typed failures the wire carries
//! (`proto::Failure`): a chain whose root is a `Failure` already says it; one that holds the
//! engine's `Uncarried` becomes `CannotCarry`; one that met a peer of another protocol
//! version becomes `Protocol`; anything else fails at the stage the caller names.

use crate::proto::{self, Failure, Stage};

/// The typed failure an error chain stands for, found at `node` while at `stage`; `peer` is the
/// node on the other end of the connection (whose version a mismatch names).
pub(crate) fn of(e: &anyhow::Error, node: &str, peer: &str, stage: Stage) -> Failure {
    if let Some(f) = e.downcast_ref::<Failure>() {
        return f.clone();
    }
    if let Some(what) = uncarried(e) {
        return Failure::CannotCarry { node: node.to_string(), what };
    }
    if let Some(proto::Error::Version { ours, theirs }) = e.downcast_ref::<proto::Error>() {
        return Failure::Protocol { node: peer.to_string(), ours: *ours, theirs: *theirs };
    }
    Failure::Failed { node: node.to_string(), stage, message: format!("{e:#}") }
}

/// The state the engine refused to carry, if that is what the chain says.
pub(crate) fn uncarried(e: &anyhow::Error) -> Option<proto::Uncarried> {
    let what = e
        .downcast_ref::<telefork_engine::Uncarried>()
        .or_else(|| e.downcast_ref::<telefork_engine::Error>().and_then(|e| e.uncarried()))?;
    Some(wire(what))
}

/// The engine's `Uncarried` in its wire form.
pub(crate) fn wire(what: &telefork_engine::Uncarried) -> proto::Uncarried {
    match what {
        telefork_engine::Uncarried::Fd { fd, kind, target } => {
            proto::Uncarried::Fd { fd: *fd, kind: kind.clone(), target: target.clone() }
        }
        telefork_engine::Uncarried::Threads { count } => {
            proto::Uncarried::Threads { count: *count as u64 }
        }
        telefork_engine::Uncarried::State { what, why } => {
            proto::Uncarried::State { what: what.clone(), why: why.clone() }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use anyhow::Context;

    /// Each kind of chain becomes its typed failure, through any context added on the way.
    #[test]
    fn chains_become_typed_failures() {
        let carried: anyhow::Result<()> =
            Err(telefork_engine::Uncarried::Threads { count: 4 }.into());
        let e = carried.context("capturing process 7").unwrap_err();
        assert_eq!(
            of(&e, "node1", "node2", Stage::Send),
            Failure::CannotCarry {
                node: "node1".into(),
                what: proto::Uncarried::Threads { count: 4 }
            }
        );
        let v: anyhow::Result<()> = Err(proto::Error::Version { ours: 1, theirs: 2 }.into());
        let e = v.context("the destination's answer").unwrap_err();
        assert_eq!(
            of(&e, "node1", "node2", Stage::Send),
            Failure::Protocol { node: "node2".into(), ours: 1, theirs: 2 }
        );
        let refused = Failure::Refused {
            node: "node2".into(),
            limit: proto::Limit::MaxImageBytes,
            reason: "too big".into(),
        };
        let r: anyhow::Result<()> = Err(refused.clone().into());
        let e = r.context("sending process 7 to node node2").unwrap_err();
        assert_eq!(of(&e, "node1", "node2", Stage::Send), refused);
        let e = anyhow::anyhow!("read failed").context("sending process 7");
        assert_eq!(
            of(&e, "node1", "node2", Stage::Send),
            Failure::Failed {
                node: "node1".into(),
                stage: Stage::Send,
                message: "sending process 7: read failed".into()
            }
        );
    }
}
