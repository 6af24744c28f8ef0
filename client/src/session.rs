//! [`SessionTokens`]: what this client has seen, per shard group, for read-your-writes.
//!
//! Owns: merging the session token of every response into the newest position per group
//! and rendering the token a `SESSION` read sends. A server token is `group:index`; the
//! client sends every group it knows, comma separated (`1:57,4:12`), and the server uses the
//! entry of the group that owns the key.
//!
//! When the client knows which shard a key is in (its routing cache), a read sends only that
//! shard's position; otherwise it sends at most `TOKEN_GROUPS_MAX` groups, the most recently
//! advanced (a server that finds no entry for the key's shard falls back to a linearizable
//! read, so a missing entry costs time, never correctness).
//!
//! Invariant: positions only grow (a response from a lagging replica never moves the
//! session back). Pure; no I/O.

use std::collections::BTreeMap;

/// The newest position seen per group.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SessionTokens {
    positions: BTreeMap<u64, u64>,
    /// When each group last advanced (a counter), to pick the recent ones.
    advanced: BTreeMap<u64, u64>,
    tick: u64,
}

/// Bound on the groups one session token names.
pub const TOKEN_GROUPS_MAX: usize = 64;

impl SessionTokens {
    /// Merges a token (`group:index`, or a comma-separated list of them). Malformed parts are
    /// ignored: a token is advisory input from the server, never a reason to fail a call.
    pub fn observe(&mut self, token: &str) {
        for part in token.split(',') {
            let Some((group, index)) = part.trim().split_once(':') else { continue };
            let (Ok(group), Ok(index)) = (group.parse::<u64>(), index.parse::<u64>()) else { continue };
            let slot = self.positions.entry(group).or_default();
            if index > *slot || !self.advanced.contains_key(&group) {
                *slot = (*slot).max(index);
                self.tick += 1;
                self.advanced.insert(group, self.tick);
            }
        }
    }

    /// The token for a read of a key in `group` (when known): that group's position alone
    /// if the session has one, else the bounded list of `token`.
    pub fn token_for(&self, group: Option<u64>) -> String {
        match group.and_then(|g| self.positions.get(&g).map(|i| (g, i))) {
            Some((g, i)) => format!("{g}:{i}"),
            None => self.token(),
        }
    }

    /// The token to send: every group's newest position, comma separated (empty when the
    /// client has seen nothing yet); the `TOKEN_GROUPS_MAX` most recently advanced groups
    /// when it has seen more.
    pub fn token(&self) -> String {
        let mut groups: Vec<u64> = self.positions.keys().copied().collect();
        if groups.len() > TOKEN_GROUPS_MAX {
            groups.sort_by_key(|g| std::cmp::Reverse(self.advanced.get(g).copied().unwrap_or(0)));
            groups.truncate(TOKEN_GROUPS_MAX);
            groups.sort_unstable();
        }
        let parts: Vec<String> = groups.iter().map(|g| format!("{g}:{}", self.positions[g])).collect();
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
    fn a_known_shard_sends_only_its_position_and_the_list_is_bounded() {
        let mut s = SessionTokens::default();
        for g in 0..100u64 {
            s.observe(&format!("{g}:{}", g + 1));
        }
        assert_eq!(s.token_for(Some(7)), "7:8");
        assert_eq!(s.token_for(Some(1_000)).split(',').count(), TOKEN_GROUPS_MAX);
        let token = s.token();
        assert!(token.contains("99:100") && !token.contains("0:1,"), "the most recent groups are kept: {token}");
    }

    #[test]
    fn malformed_parts_are_ignored() {
        let mut s = SessionTokens::default();
        s.observe("garbage,1:x,:3,2:5,");
        assert_eq!(s.token(), "2:5");
    }
}
