//! The destination's state machine after it accepted an offer: which message may come in which
//! stage. Pure, so every order a broken or hostile source could send is unit-tested here.
//!
//! ```text
//!                                       Pages, RoundEnd            PageBatch
//!                                      ┌────────┐                 ┌────────┐
//!                                      ▼        │                 ▼        │
//!  Accepted ── EarlyState (once) ──► Precopy ────┴── PageBatch ──► Final ───┘
//!                                      │                            │
//!                                      └───────── State ────────────┴──► Restored ── Commit ──► Resumed
//! ```
//!
//! The early state comes first and once: a State (the blackout's rest of it) is meaningless
//! without it, and a second EarlyState after pages moved could only be a confused source.
//!
//! Abort is accepted in every stage (it ends the migration with the source's reason); any
//! other message out of its stage is refused with an error that names what was expected, and
//! the guest never runs: only `Restored` (the whole state restored) accepts Commit.

use blip_transport::protocol::Message;

use super::MigrationError;

/// Where an incoming migration stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    /// Accept was sent: only the early state may come (it is applied before any round).
    Accepted,
    /// Pre-copy rounds: live pages, round ends, and the last live round on the control stream.
    Precopy,
    /// The guest is paused on the source: final page batches until the state.
    Final,
    /// The state is restored and Ready was sent: only Commit (or Abort) may follow.
    Restored,
    /// Committed and running here.
    Resumed,
}

impl Stage {
    /// What this stage accepts, for errors.
    fn expects(self) -> &'static str {
        match self {
            Stage::Accepted => "EarlyState",
            Stage::Precopy => "Pages, RoundEnd, PageBatch or State",
            Stage::Final => "PageBatch or State",
            Stage::Restored => "Commit",
            Stage::Resumed => "nothing (the guest runs here)",
        }
    }
}

/// The stage after `msg` arrives in `stage`, or why `msg` is refused there.
pub fn step(stage: Stage, msg: &Message) -> Result<Stage, MigrationError> {
    use Stage::*;
    match (stage, msg) {
        (Accepted, Message::EarlyState(_)) => Ok(Precopy),
        (Precopy, Message::Pages { .. } | Message::RoundEnd { .. }) => Ok(Precopy),
        (Precopy | Final, Message::PageBatch { .. }) => Ok(Final),
        (Precopy | Final, Message::State(_)) => Ok(Restored),
        (Restored, Message::Commit) => Ok(Resumed),
        (_, Message::Abort { reason }) => Err(MigrationError::Aborted(reason.clone())),
        (s, other) => Err(MigrationError::OutOfOrder {
            stage: s,
            got: other.kind(),
            expected: s.expects(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pages() -> Message {
        Message::Pages { gpa: 0, count: 1 }
    }
    fn round_end() -> Message {
        Message::RoundEnd { round: 0, pages: 1 }
    }
    fn batch() -> Message {
        Message::PageBatch { runs: vec![(0, 1)] }
    }
    fn state() -> Message {
        Message::State(vec![1, 2, 3])
    }

    fn early() -> Message {
        Message::EarlyState(vec![4, 5])
    }

    /// Feeds `msgs` from Precopy; returns the final stage or the first refusal.
    fn run(msgs: &[Message]) -> Result<Stage, MigrationError> {
        msgs.iter().try_fold(Stage::Precopy, step)
    }

    #[test]
    fn the_early_state_comes_first_and_once() {
        let whole = [
            early(),
            pages(),
            round_end(),
            batch(),
            state(),
            Message::Commit,
        ];
        assert_eq!(
            whole.iter().try_fold(Stage::Accepted, step).unwrap(),
            Stage::Resumed
        );
        // Anything else right after Accept is refused, naming the early state.
        for first in [pages(), round_end(), batch(), state(), Message::Commit] {
            let e = step(Stage::Accepted, &first).unwrap_err();
            assert!(
                e.to_string().contains("expected EarlyState"),
                "{first:?}: {e}"
            );
        }
        // A second one, in any later stage, is refused.
        for s in [
            Stage::Precopy,
            Stage::Final,
            Stage::Restored,
            Stage::Resumed,
        ] {
            assert!(step(s, &early()).is_err(), "{s:?} took a second EarlyState");
        }
        assert!(matches!(
            step(Stage::Accepted, &Message::Abort { reason: "x".into() }),
            Err(MigrationError::Aborted(_))
        ));
    }

    #[test]
    fn a_whole_migration_ends_resumed() {
        let msgs = [
            pages(),
            round_end(),
            pages(),
            round_end(),
            pages(),
            batch(),
            batch(),
            state(),
            Message::Commit,
        ];
        assert_eq!(run(&msgs).unwrap(), Stage::Resumed);
        // No final pages at all (nothing dirty at the pause) is fine too.
        assert_eq!(
            run(&[round_end(), state(), Message::Commit]).unwrap(),
            Stage::Resumed
        );
    }

    #[test]
    fn commit_before_the_state_is_refused() {
        for msgs in [
            vec![Message::Commit],
            vec![pages(), round_end(), Message::Commit],
            vec![batch(), Message::Commit],
        ] {
            let e = run(&msgs).unwrap_err();
            assert!(
                matches!(e, MigrationError::OutOfOrder { .. }),
                "{msgs:?}: {e}"
            );
            assert!(e.to_string().contains("Commit"), "{e}");
        }
    }

    #[test]
    fn pages_after_the_state_are_refused() {
        for late in [pages(), batch(), round_end(), state()] {
            let e = run(&[round_end(), state(), late.clone()]).unwrap_err();
            assert!(e.to_string().contains("expected Commit"), "{late:?}: {e}");
        }
    }

    #[test]
    fn live_pages_and_round_ends_after_the_final_batch_are_refused() {
        for late in [pages(), round_end()] {
            let e = run(&[batch(), late]).unwrap_err();
            assert!(matches!(
                e,
                MigrationError::OutOfOrder {
                    stage: Stage::Final,
                    ..
                }
            ));
        }
    }

    #[test]
    fn handshake_messages_are_refused_after_the_offer() {
        for s in [
            Stage::Precopy,
            Stage::Final,
            Stage::Restored,
            Stage::Resumed,
        ] {
            for m in [
                Message::Accept,
                Message::Ready { mem_hash: 0 },
                Message::RoundAck { round: 0 },
            ] {
                assert!(step(s, &m).is_err(), "{s:?} took {m:?}");
            }
        }
        assert!(step(Stage::Resumed, &Message::Commit).is_err());
    }

    #[test]
    fn abort_ends_every_stage_with_the_reason() {
        for s in [Stage::Precopy, Stage::Final, Stage::Restored] {
            let e = step(
                s,
                &Message::Abort {
                    reason: "disk full".into(),
                },
            )
            .unwrap_err();
            assert!(matches!(e, MigrationError::Aborted(ref r) if r == "disk full"));
        }
    }
}
