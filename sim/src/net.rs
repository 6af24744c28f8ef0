//! The simulated network: node-to-node calls delivered in simulated time, with seeded
//! delay, loss, duplication (of raft messages only) and partitions.
//!
//! Owns: which node incarnations are reachable, the link rules, and the seeded generator
//! for every network decision. Implements the node's `Transport`, so the real raft code
//! sends through it unchanged.
//!
//! Invariants: every decision is drawn from the seeded generator in call order, so a seed
//! replays exactly; forwarded client requests are never duplicated (TCP does not duplicate
//! application messages; raft messages are duplicated to test idempotence).

use crate::trace::{digest, Trace};
use floe_node::raft::runtime::TaskOwner;
use floe_node::transport::{Envelope, Inbound, RpcKind, Transport, TransportError};
use futures::future::BoxFuture;
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Network fault settings, drawn per seed.
#[derive(Clone, Debug, PartialEq)]
pub struct NetProfile {
    /// Probability that a message (request or reply) is lost.
    pub loss: f64,
    /// Probability that a raft request is delivered twice.
    pub duplicate: f64,
    pub delay_min_us: u64,
    pub delay_max_us: u64,
}

impl NetProfile {
    pub fn calm() -> Self {
        Self { loss: 0.0, duplicate: 0.0, delay_min_us: 100, delay_max_us: 1_000 }
    }
}

struct NetState {
    rng: ChaCha8Rng,
    /// Reachable nodes: their inbound side and the owner their handlers run under.
    live: BTreeMap<u64, (Arc<dyn Inbound>, TaskOwner)>,
    /// Directed links that drop everything: (from, to).
    cut: BTreeSet<(u64, u64)>,
    profile: NetProfile,
}

/// The simulated network shared by all nodes.
pub struct SimNet {
    state: Mutex<NetState>,
    trace: Arc<Trace>,
}

/// What happens to one message.
enum Fate {
    Deliver(Duration),
    Lose,
}

/// Address of node `id` on the simulated network.
pub fn addr_of(id: u64) -> String {
    format!("n{id}")
}

fn id_of(addr: &str) -> Option<u64> {
    addr.strip_prefix('n')?.parse().ok()
}

fn kind_name(kind: RpcKind) -> &'static str {
    match kind {
        RpcKind::AppendEntries => "append",
        RpcKind::Vote => "vote",
        RpcKind::Forward => "forward",
    }
}

impl SimNet {
    pub fn new(rng: ChaCha8Rng, profile: NetProfile, trace: Arc<Trace>) -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new(NetState { rng, live: BTreeMap::new(), cut: BTreeSet::new(), profile }),
            trace,
        })
    }

    fn with<T>(&self, f: impl FnOnce(&mut NetState) -> T) -> T {
        let mut g = self.state.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut g)
    }

    /// Makes node `id` reachable through `inbound` (a new incarnation after a restart).
    pub fn attach(&self, id: u64, inbound: Arc<dyn Inbound>, owner: TaskOwner) {
        self.with(|s| s.live.insert(id, (inbound, owner)));
    }

    /// Makes node `id` unreachable (crashed).
    pub fn detach(&self, id: u64) {
        self.with(|s| s.live.remove(&id));
    }

    /// Cuts every link to and from `id`.
    pub fn isolate(&self, id: u64, all: &[u64]) {
        self.with(|s| {
            for other in all.iter().copied().filter(|o| *o != id) {
                s.cut.insert((id, other));
                s.cut.insert((other, id));
            }
        });
    }

    /// Cuts only `from → to`.
    pub fn cut_one_way(&self, from: u64, to: u64) {
        self.with(|s| s.cut.insert((from, to)));
    }

    /// Restores every link.
    pub fn heal(&self) {
        self.with(|s| s.cut.clear());
    }

    pub fn set_profile(&self, profile: NetProfile) {
        self.with(|s| s.profile = profile);
    }

    fn fate(&self, from: u64, to: u64) -> Fate {
        self.with(|s| {
            let lost = s.cut.contains(&(from, to)) || (s.profile.loss > 0.0 && s.rng.gen_bool(s.profile.loss));
            let delay = s.rng.gen_range(s.profile.delay_min_us..=s.profile.delay_max_us.max(s.profile.delay_min_us));
            if lost {
                Fate::Lose
            } else {
                Fate::Deliver(Duration::from_micros(delay))
            }
        })
    }

    fn duplicate(&self, kind: RpcKind) -> bool {
        kind != RpcKind::Forward && self.with(|s| s.profile.duplicate > 0.0 && s.rng.gen_bool(s.profile.duplicate))
    }

    fn target(&self, to: u64) -> Option<(Arc<dyn Inbound>, TaskOwner)> {
        self.with(|s| s.live.get(&to).cloned())
    }

    /// One request-reply exchange through the simulated links.
    async fn exchange<F>(
        self: Arc<Self>,
        env: Envelope,
        what: &'static str,
        bytes: u64,
        timeout: Duration,
        deliver: F,
    ) -> Result<Vec<u8>, TransportError>
    where
        F: FnOnce(Arc<dyn Inbound>) -> BoxFuture<'static, Result<Vec<u8>, String>>,
    {
        let (from, to, group) = (env.from_node, env.to_node, env.group_id);
        let label = Label { what, from, to, group, bytes };
        let Fate::Deliver(delay) = self.fate(from, to) else {
            self.trace.record_args(format_args!("lose-req {label}"));
            tokio::time::sleep(timeout).await;
            return Err(TransportError::Timeout(timeout));
        };
        tokio::time::sleep(delay).await;
        let Some((inbound, owner)) = self.target(to) else {
            self.trace.record_args(format_args!("refused {label}"));
            return Err(TransportError::Unreachable(format!("node {to} is down")));
        };
        self.trace.record_args(format_args!("deliver {label}"));
        // The handler runs as a task of the receiving node: if that node is killed while
        // handling, the task dies with it and the caller sees a broken connection.
        let handler = owner.spawn(deliver(inbound));
        let reply = match tokio::time::timeout(timeout, handler).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => return Err(TransportError::Network(format!("node {to} died while handling the message"))),
            Err(_) => return Err(TransportError::Timeout(timeout)),
        };
        let Fate::Deliver(back) = self.fate(to, from) else {
            self.trace.record_args(format_args!("lose-reply {label}"));
            tokio::time::sleep(timeout.saturating_sub(delay)).await;
            return Err(TransportError::Timeout(timeout));
        };
        tokio::time::sleep(back).await;
        self.trace.record_args(format_args!("reply {label} ok={}", reply.is_ok()));
        reply.map_err(TransportError::Refused)
    }
}

/// How a message appears in the trace: kind, link, group and body digest.
#[derive(Clone, Copy)]
struct Label {
    what: &'static str,
    from: u64,
    to: u64,
    group: u64,
    bytes: u64,
}

impl std::fmt::Display for Label {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let Label { what, from, to, group, bytes } = self;
        write!(f, "{what} {from}->{to} g{group} h{bytes:x}")
    }
}

/// `Transport` for one node, over the shared `SimNet`.
#[derive(Clone)]
pub struct SimTransport {
    pub net: Arc<SimNet>,
}

impl Transport for SimTransport {
    fn call(
        &self,
        addr: String,
        envelope: Envelope,
        kind: RpcKind,
        payload: Vec<u8>,
        timeout: Duration,
    ) -> BoxFuture<'static, Result<Vec<u8>, TransportError>> {
        let net = self.net.clone();
        Box::pin(async move {
            if id_of(&addr) != Some(envelope.to_node) {
                return Err(TransportError::Unreachable(format!("no simulated node at {addr:?}")));
            }
            let body = digest(&payload);
            if net.duplicate(kind) {
                let (net2, env2, payload2) = (net.clone(), envelope.clone(), payload.clone());
                tokio::spawn(async move {
                    let _ = net2
                        .exchange(env2.clone(), "dup", body, timeout, move |ib| ib.handle(env2, kind, payload2))
                        .await;
                });
            }
            let env = envelope.clone();
            net.exchange(envelope, kind_name(kind), body, timeout, move |ib| ib.handle(env, kind, payload)).await
        })
    }

    fn send_snapshot(
        &self,
        _addr: String,
        envelope: Envelope,
        header: Vec<u8>,
        data: Vec<u8>,
        timeout: Duration,
    ) -> BoxFuture<'static, Result<Vec<u8>, TransportError>> {
        let net = self.net.clone();
        Box::pin(async move {
            let body = digest(&header) ^ digest(&data).rotate_left(1);
            let env = envelope.clone();
            net.exchange(envelope, "snapshot", body, timeout, move |ib| ib.handle_snapshot(env, header, data)).await
        })
    }
}
