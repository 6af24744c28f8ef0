//! The run's trace hash: FNV-1a over one canonical line per event (simulated time, what
//! happened, to whom), so two runs of one seed can be compared bit for bit.
//!
//! Invariant: only structured, deterministic facts go in (no wall time, no pointers, no
//! hash-map order); the same seed on the same build yields the same hash.

use std::fmt::{self, Write as _};
use std::sync::Mutex;

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

/// FNV-1a of `bytes`, continuing from `hash`.
pub fn fnv1a(mut hash: u64, bytes: &[u8]) -> u64 {
    for b in bytes {
        hash ^= u64::from(*b);
        hash = hash.wrapping_mul(FNV_PRIME);
    }
    hash
}

/// A digest of a message body for the trace: FNV-style over 8-byte words (then the tail
/// bytewise), an eighth of `fnv1a`'s multiplications; bodies are hashed on every delivery.
pub fn digest(bytes: &[u8]) -> u64 {
    let mut hash = FNV_OFFSET;
    let mut words = bytes.chunks_exact(8);
    for word in &mut words {
        let mut w = [0u8; 8];
        w.copy_from_slice(word);
        hash ^= u64::from_le_bytes(w);
        hash = hash.wrapping_mul(FNV_PRIME);
    }
    fnv1a(hash, words.remainder())
}

/// Feeds formatted text straight into the hash (no string is built).
struct HashWriter(u64);

impl fmt::Write for HashWriter {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        self.0 = fnv1a(self.0, s.as_bytes());
        Ok(())
    }
}

/// One entry of the human timeline (`floe-sim replay --html`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mark {
    /// Simulated microseconds since the start of the run.
    pub at_us: u64,
    /// Row of the timeline: `client N`, `faults`, `leaders`.
    pub lane: String,
    pub text: String,
    /// 1-based history line, for client events.
    pub line: Option<usize>,
}

/// Accumulates the trace hash and counts events.
#[derive(Debug)]
pub struct Trace {
    inner: Mutex<(u64, u64)>,
    start: tokio::time::Instant,
    /// Print every event line to stderr (`FLOE_SIM_TRACE=1`), for debugging a seed.
    echo: bool,
    marks: Mutex<Vec<Mark>>,
}

impl Trace {
    pub fn new() -> Self {
        let echo = std::env::var_os("FLOE_SIM_TRACE").is_some_and(|v| v != "0");
        Self { inner: Mutex::new((FNV_OFFSET, 0)), start: tokio::time::Instant::now(), echo, marks: Mutex::default() }
    }

    /// Simulated microseconds since the run started.
    pub fn now_us(&self) -> u64 {
        tokio::time::Instant::now().saturating_duration_since(self.start).as_micros() as u64
    }

    /// Records one event line (prefixed with the simulated time).
    pub fn record(&self, line: &str) {
        self.record_args(format_args!("{line}"));
    }

    /// `record` of formatted text, hashed as it is formatted (events are recorded for every
    /// message: building a string for each cost the simulator about 6 % of its time).
    pub fn record_args(&self, line: fmt::Arguments<'_>) {
        let now = self.now_us();
        if self.echo {
            eprintln!("{now} {line}");
        }
        if let Ok(mut g) = self.inner.lock() {
            let mut hasher = HashWriter(g.0);
            let _ = writeln!(hasher, "{now} {line}");
            g.0 = hasher.0;
            g.1 += 1;
        }
    }

    /// Records a timeline entry (and hashes it like any event).
    pub fn mark(&self, lane: &str, text: &str, line: Option<usize>) {
        self.record(&format!("{lane}: {text}"));
        let at_us = self.now_us();
        if let Ok(mut m) = self.marks.lock() {
            m.push(Mark { at_us, lane: lane.to_string(), text: text.to_string(), line });
        }
    }

    pub fn marks(&self) -> Vec<Mark> {
        self.marks.lock().map(|m| m.clone()).unwrap_or_default()
    }

    pub fn hash(&self) -> u64 {
        self.inner.lock().map(|g| g.0).unwrap_or(0)
    }

    pub fn events(&self) -> u64 {
        self.inner.lock().map(|g| g.1).unwrap_or(0)
    }
}

impl Default for Trace {
    fn default() -> Self {
        Self::new()
    }
}
