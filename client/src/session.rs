//! [`SessionTokens`]: what this client has seen, per shard group, for read-your-writes.
//!
//! Owns: merging the session token of every response into the newest position per group
//! and rendering the token a `SESSION` read sends. A server token is `group:index`; the
//! client sends every group it knows, comma separated (`1:57,4:12`), and the server uses the
//! entry of the group that owns the key.
//!
//! Invariant: positions only grow (a response from a lagging replica never moves the
//! session back). Pure; no I/O.

use std::collections::BTreeMap;

/// The newest position seen per group.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SessionTokens {
    positions: BTreeMap<u64, u64>,
}

impl SessionTokens {
    /// Merges a token (`group:index`, or a comma-separated list of them). Malformed parts are
    /// ignored: a token is advisory input from the server, never a reason to fail a call.
    pub fn observe(&mut self, token: &str) {
        for part in token.split(',') {
            let Some((group, index)) = part.trim().split_once(':') else { continue };
            let (Ok(group), Ok(index)) = (group.parse::<u64>(), index.parse::<u64>()) else { continue };
            let slot = self.positions.entry(group).or_default();
            *slot = (*slot).max(index);
        }
    }

    /// The token to send: every group's newest position, comma separated (empty when the
    /// client has seen nothing yet).
    pub fn token(&self) -> String {
        let parts: Vec<String> = self.positions.iter().map(|(g, i)| format!("{g}:{i}")).collect();
        parts.join(",")
    }

    /// The newest position seen in `group`.
    pub fn position(&self, group: u64) -> Option<u64> {
        self.positions.get(&group).copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_only_grow_and_render_sorted() {
        let mut s = SessionTokens::default();
        assert_eq!(s.token(), "");
        s.observe("4:12");
        s.observe("1:57");
        s.observe("1:30"); // a lagging replica's answer does not move the session back
        assert_eq!(s.token(), "1:57,4:12");
        s.observe("1:60,4:11,9:1");
        assert_eq!(s.token(), "1:60,4:12,9:1");
        assert_eq!(s.position(4), Some(12));
        assert_eq!(s.position(5), None);
    }

    #[test]
    fn malformed_parts_are_ignored() {
        let mut s = SessionTokens::default();
        s.observe("garbage,1:x,:3,2:5,");
        assert_eq!(s.token(), "2:5");
    }
}
