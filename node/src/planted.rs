//! Planted bugs: known-wrong behaviours the simulator must catch, compiled in only with the
//! test-only cargo feature `planted-bugs` (production builds contain none of it: without the
//! feature `is_planted` is a constant `false` and every planted branch is dead code).
//!
//! - `stale-strong-read`: a STRONG read is served from local state without confirming
//!   leadership or waiting for the read index;
//! - `ack-before-commit`: a write is acknowledged as soon as it is handed to raft, before it
//!   is committed;
//! - `lost-session`: a SESSION read ignores its token and serves local state;
//! - `stale-bounded-read`: a BOUNDED_STALENESS read serves local state without a freshness
//!   proof (an isolated follower answers from arbitrarily old state);
//! - `split-drops-entry`: a split hands each child its data without the last write into the
//!   child's range (as a split that copied the data one entry too early would).

/// Names of the bugs that can be planted.
pub const PLANTED_BUGS: &[&str] =
    &["stale-strong-read", "ack-before-commit", "lost-session", "stale-bounded-read", "split-drops-entry"];

#[cfg(feature = "planted-bugs")]
static PLANTED: std::sync::Mutex<Option<String>> = std::sync::Mutex::new(None);

/// Plants `bug` (or clears with `None`) for the whole process. Errors when the bug is
/// unknown or the build has no planted bugs.
pub fn plant(bug: Option<&str>) -> Result<(), String> {
    if let Some(b) = bug {
        if !PLANTED_BUGS.contains(&b) {
            return Err(format!("unknown planted bug {b:?}; known: {PLANTED_BUGS:?}"));
        }
    }
    #[cfg(feature = "planted-bugs")]
    {
        let mut slot = PLANTED.lock().unwrap_or_else(|p| p.into_inner());
        *slot = bug.map(str::to_string);
        Ok(())
    }
    #[cfg(not(feature = "planted-bugs"))]
    {
        match bug {
            None => Ok(()),
            Some(_) => Err("this build has no planted bugs (build with --features planted-bugs)".into()),
        }
    }
}

/// True when `bug` is planted.
#[inline]
pub fn is_planted(bug: &str) -> bool {
    #[cfg(feature = "planted-bugs")]
    {
        PLANTED.lock().map(|s| s.as_deref() == Some(bug)).unwrap_or(false)
    }
    #[cfg(not(feature = "planted-bugs"))]
    {
        let _ = bug;
        false
    }
}
