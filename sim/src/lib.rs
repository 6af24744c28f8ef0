//! floe-sim: Floe's deterministic simulator and its consistency checkers.
//!
//! Codemap:
//! - [`history`]: the Jepsen-style JSONL event format and its parse into paired operations.
//! - [`linearizability`]: the per-key Wing & Gong / Lowe / Porcupine linearizability checker.
//! - [`staleness`]: the bounded-staleness checker (reads never older than their bound).
//! - [`cli`]: the `floe-sim` command line (argument definitions, rendering, exit codes).
//!
//! Invariants: `history`, `linearizability` and `staleness` are pure and deterministic (no I/O, no clock,
//! no randomness, no unbounded search); only `cli` reads files and writes to the terminal.
//! - [`run`]: one seeded run of real node code ([`cluster`]) on the simulated network
//!   ([`net`]), with faults, a recorded history, the checks, and the [`trace`] hash.

pub mod cli;
pub mod cluster;
pub mod history;
pub mod html;
pub mod linearizability;
pub mod net;
pub mod run;
pub mod staleness;
pub mod trace;
