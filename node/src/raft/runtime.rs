//! `FloeRuntime`: openraft's async runtime on tokio with a seedable random source.
//!
//! openraft 0.9 draws its only randomness (election timeouts) from `AsyncRuntime::thread_rng`.
//! The stock `TokioRuntime` uses the OS-seeded `rand::thread_rng`, which makes a simulated run
//! irreproducible. Here every draw comes from a per-thread ChaCha generator: seeded from OS
//! entropy by default, or from a fixed seed by `seed_thread_rng` (the simulator runs a whole
//! cluster on one thread and seeds it per run).
//!
//! It also owns task ownership: every task spawned through `spawn` (openraft's own tasks
//! included) inside a `TaskOwner::scope` belongs to that owner, and `abort_all` kills them
//! all at once, which is how the simulator hard-kills a node.
//!
//! Invariant: openraft 0.9 reads no other randomness through the runtime (its few unbiased
//! `select!`s draw from tokio's own RNG); everything else delegates to tokio.

use openraft::async_runtime::TokioOneShotSender;
use openraft::{AsyncRuntime, OptionalSend, TokioInstant};
use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::cell::RefCell;
use std::future::Future;
use std::time::Duration;

thread_local! {
    static THREAD_RNG: RefCell<Option<ChaCha8Rng>> = const { RefCell::new(None) };
}

tokio::task_local! {
    static OWNER: TaskOwner;
}

/// Holds the tasks of a paused owner: while `paused`, none of them is polled.
#[derive(Default, Debug)]
struct PauseGate {
    paused: std::sync::atomic::AtomicBool,
    parked: std::sync::Mutex<Vec<std::task::Waker>>,
}

/// A task's future behind its owner's pause gate.
struct Gated<F> {
    inner: std::pin::Pin<Box<F>>,
    gate: std::sync::Arc<PauseGate>,
}

impl<F: Future> Future for Gated<F> {
    type Output = F::Output;

    fn poll(mut self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<F::Output> {
        if self.gate.paused.load(std::sync::atomic::Ordering::Acquire) {
            if let Ok(mut parked) = self.gate.parked.lock() {
                parked.push(cx.waker().clone());
            }
            return std::task::Poll::Pending;
        }
        self.inner.as_mut().poll(cx)
    }
}

/// The tasks of one node incarnation. Cheap to clone.
#[derive(Clone, Debug)]
pub struct TaskOwner {
    handles: std::sync::Arc<std::sync::Mutex<Vec<tokio::task::AbortHandle>>>,
    gate: std::sync::Arc<PauseGate>,
    /// Every task of the owner runs in this span (the simulator names its nodes with it, so
    /// log lines say which node wrote them); none by default.
    span: tracing::Span,
}

impl Default for TaskOwner {
    fn default() -> Self {
        Self { handles: Default::default(), gate: Default::default(), span: tracing::Span::none() }
    }
}

impl TaskOwner {
    pub fn new() -> Self {
        Self::default()
    }

    /// An owner whose tasks log inside a `node` span with this id.
    pub fn for_node(node: u64) -> Self {
        Self { span: tracing::info_span!("node", id = node), ..Self::default() }
    }

    /// Runs `f` so that every task it spawns through `spawn` belongs to this owner.
    pub async fn scope<F: Future>(&self, f: F) -> F::Output {
        OWNER.scope(self.clone(), tracing::Instrument::instrument(f, self.span.clone())).await
    }

    /// Spawns `f` as a task of this owner.
    pub fn spawn<F>(&self, f: F) -> tokio::task::JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        let f = tracing::Instrument::instrument(f, self.span.clone());
        let gated = Gated { inner: Box::pin(OWNER.scope(self.clone(), f)), gate: self.gate.clone() };
        let handle = tokio::task::spawn(gated);
        if let Ok(mut handles) = self.handles.lock() {
            if handles.len() >= 1024 {
                handles.retain(|h| !h.is_finished());
            }
            handles.push(handle.abort_handle());
        }
        handle
    }

    /// Stops polling every task of this owner until `resume` (a paused process: timers run
    /// on, nothing it owns makes progress).
    pub fn pause(&self) {
        self.gate.paused.store(true, std::sync::atomic::Ordering::Release);
    }

    /// Lets the tasks of this owner run again, waking them in the order they parked.
    pub fn resume(&self) {
        self.gate.paused.store(false, std::sync::atomic::Ordering::Release);
        let parked = self.gate.parked.lock().map(|mut p| std::mem::take(&mut *p)).unwrap_or_default();
        for w in parked {
            w.wake();
        }
    }

    /// Aborts every task of this owner (a hard kill: no task runs another step).
    pub fn abort_all(&self) {
        if let Ok(mut handles) = self.handles.lock() {
            for h in handles.drain(..) {
                h.abort();
            }
        }
    }
}

/// Spawns a task owned by the current task's owner, if any (see `TaskOwner`).
pub fn spawn<F>(f: F) -> tokio::task::JoinHandle<F::Output>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    match OWNER.try_with(|o| o.clone()) {
        Ok(owner) => owner.spawn(f),
        Err(_) => tokio::task::spawn(f),
    }
}

/// Makes every later draw on this thread deterministic from `seed`.
pub fn seed_thread_rng(seed: u64) {
    THREAD_RNG.with(|r| *r.borrow_mut() = Some(ChaCha8Rng::seed_from_u64(seed)));
}

fn with_rng<T>(f: impl FnOnce(&mut ChaCha8Rng) -> T) -> T {
    THREAD_RNG.with(|r| {
        let mut slot = r.borrow_mut();
        let rng = slot.get_or_insert_with(ChaCha8Rng::from_entropy);
        f(rng)
    })
}

/// A handle drawing from this thread's generator.
#[derive(Debug, Default, Clone, Copy)]
pub struct FloeRng;

impl RngCore for FloeRng {
    fn next_u32(&mut self) -> u32 {
        with_rng(|r| r.next_u32())
    }
    fn next_u64(&mut self) -> u64 {
        with_rng(|r| r.next_u64())
    }
    fn fill_bytes(&mut self, dest: &mut [u8]) {
        with_rng(|r| r.fill_bytes(dest))
    }
    fn try_fill_bytes(&mut self, dest: &mut [u8]) -> Result<(), rand::Error> {
        with_rng(|r| r.try_fill_bytes(dest))
    }
}

/// tokio-backed runtime with the seedable random source above.
#[derive(Debug, Default, PartialEq, Eq, Clone, Copy)]
pub struct FloeRuntime;

impl AsyncRuntime for FloeRuntime {
    type JoinError = tokio::task::JoinError;
    type JoinHandle<T: OptionalSend + 'static> = tokio::task::JoinHandle<T>;
    type Sleep = tokio::time::Sleep;
    type Instant = TokioInstant;
    type TimeoutError = tokio::time::error::Elapsed;
    type Timeout<R, T: Future<Output = R> + OptionalSend> = tokio::time::Timeout<T>;
    type ThreadLocalRng = FloeRng;
    type OneshotSender<T: OptionalSend> = TokioOneShotSender<T>;
    type OneshotReceiverError = tokio::sync::oneshot::error::RecvError;
    type OneshotReceiver<T: OptionalSend> = tokio::sync::oneshot::Receiver<T>;

    fn spawn<T>(future: T) -> Self::JoinHandle<T::Output>
    where
        T: Future + OptionalSend + 'static,
        T::Output: OptionalSend + 'static,
    {
        spawn(future)
    }

    fn sleep(duration: Duration) -> Self::Sleep {
        tokio::time::sleep(duration)
    }

    fn sleep_until(deadline: Self::Instant) -> Self::Sleep {
        tokio::time::sleep_until(deadline)
    }

    fn timeout<R, F: Future<Output = R> + OptionalSend>(duration: Duration, future: F) -> Self::Timeout<R, F> {
        tokio::time::timeout(duration, future)
    }

    fn timeout_at<R, F: Future<Output = R> + OptionalSend>(deadline: Self::Instant, future: F) -> Self::Timeout<R, F> {
        tokio::time::timeout_at(deadline, future)
    }

    fn is_panic(join_error: &Self::JoinError) -> bool {
        join_error.is_panic()
    }

    fn thread_rng() -> Self::ThreadLocalRng {
        FloeRng
    }

    fn oneshot<T>() -> (Self::OneshotSender<T>, Self::OneshotReceiver<T>)
    where
        T: OptionalSend,
    {
        let (tx, rx) = tokio::sync::oneshot::channel();
        (TokioOneShotSender(tx), rx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::Rng;

    #[test]
    fn seeded_draws_repeat() {
        seed_thread_rng(7);
        let a: Vec<u64> = (0..4).map(|_| FloeRuntime::thread_rng().gen()).collect();
        seed_thread_rng(7);
        let b: Vec<u64> = (0..4).map(|_| FloeRuntime::thread_rng().gen()).collect();
        assert_eq!(a, b);
        seed_thread_rng(8);
        let c: Vec<u64> = (0..4).map(|_| FloeRuntime::thread_rng().gen()).collect();
        assert_ne!(a, c);
    }
}
