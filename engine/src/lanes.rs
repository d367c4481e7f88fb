//! The queues between the shards and the location store's thread (cluster mode), with no
//! lock on either side. `async-channel` woke a parked side through `event-listener`, which
//! takes a `std::sync::Mutex`: a pinned shard could sleep on a futex the store thread held.
//!
//! - [`lane`]: shards → store thread. A bounded lock-free queue (`crossbeam-queue`); a
//!   receiver that found it empty and waits is woken by one byte on a socket pair, which
//!   the store thread's runtime (tokio) watches: the kernel wakes it, nothing in user space
//!   is shared but atomics. A byte is written only when the receiver said it waits.
//! - [`Replies`]: store thread → one shard. An unbounded lock-free queue and an
//!   `AtomicWaker`; waking a glommio task from another thread goes through glommio's own
//!   lock-free foreign-wake queue.
//!
//! ```text
//!  shard ─ try_send ─► ArrayQueue ─► store thread (recv: pop, else waiting = true, re-check,
//!                      └ waiting? ─ 1 byte ─► socket pair ─► tokio readable)
//!  store ─ push ─► SegQueue ─► AtomicWaker::wake ─► the shard's reply task
//! ```

use crossbeam_queue::{ArrayQueue, SegQueue};
use futures_util::task::AtomicWaker;
use std::io::{ErrorKind, Write};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering, fence};
use std::task::{Context, Poll};
use std::time::Duration;

struct Lane<T> {
    q: ArrayQueue<T>,
    /// The receiving end still exists: once it is gone (the store thread stopped, or never
    /// started) a send fails at once, as into a full queue, instead of waiting for no one.
    rx_alive: AtomicBool,
    /// The receiver found the queue empty and waits for the bell.
    waiting: AtomicBool,
    /// Senders alive; at none, `closed` (the receiver ends once the queue is empty).
    senders: AtomicUsize,
    closed: AtomicBool,
    /// The write end of the bell (non-blocking: a full buffer already means "wake up").
    bell: UnixStream,
}

impl<T> Lane<T> {
    fn ring_if_waiting(&self) {
        fence(Ordering::SeqCst);
        if self.waiting.swap(false, Ordering::SeqCst) && self.rx_alive.load(Ordering::SeqCst) {
            let _ = (&self.bell).write(&[1]);
        }
    }
}

/// A bounded many-to-one queue of `capacity`: its sending half (cheap to clone, `Send`) and
/// its receiving half (turned into the store thread's [`LaneRx`] inside its runtime).
pub fn lane<T>(capacity: usize) -> std::io::Result<(LaneTx<T>, LaneEnd<T>)> {
    let (w, r) = UnixStream::pair()?;
    w.set_nonblocking(true)?;
    r.set_nonblocking(true)?;
    let lane = Arc::new(Lane {
        q: ArrayQueue::new(capacity.max(1)),
        rx_alive: AtomicBool::new(true),
        waiting: AtomicBool::new(false),
        senders: AtomicUsize::new(1),
        closed: AtomicBool::new(false),
        bell: w,
    });
    Ok((
        LaneTx(lane.clone()),
        LaneEnd {
            lane: RxGuard(lane),
            bell: r,
        },
    ))
}

/// Held by the receiving end, before and after it joins its runtime: its drop tells the
/// senders that no one receives any more.
struct RxGuard<T>(Arc<Lane<T>>);

impl<T> Drop for RxGuard<T> {
    fn drop(&mut self) {
        self.0.rx_alive.store(false, Ordering::SeqCst);
    }
}

/// The sending half of a [`lane`].
pub struct LaneTx<T>(Arc<Lane<T>>);

impl<T> LaneTx<T> {
    /// Queues `v`; false (and `v` dropped) when the queue is full or no one receives.
    pub fn try_send(&self, v: T) -> bool {
        if !self.0.rx_alive.load(Ordering::SeqCst) || self.0.q.push(v).is_err() {
            return false;
        }
        self.0.ring_if_waiting();
        true
    }
}

impl<T> Clone for LaneTx<T> {
    fn clone(&self) -> Self {
        self.0.senders.fetch_add(1, Ordering::SeqCst);
        LaneTx(self.0.clone())
    }
}

impl<T> Drop for LaneTx<T> {
    fn drop(&mut self) {
        if self.0.senders.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.closed.store(true, Ordering::SeqCst);
            self.0.ring_if_waiting();
        }
    }
}

impl<T> std::fmt::Debug for LaneTx<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LaneTx")
            .field("queued", &self.0.q.len())
            .finish()
    }
}

/// The receiving half of a [`lane`], before it joins a tokio runtime.
pub struct LaneEnd<T> {
    lane: RxGuard<T>,
    bell: UnixStream,
}

impl<T> LaneEnd<T> {
    /// The receiver, registered with the current tokio runtime (call inside it).
    pub fn into_rx(self) -> std::io::Result<LaneRx<T>> {
        Ok(LaneRx {
            bell: tokio::net::UnixStream::from_std(self.bell)?,
            lane: self.lane,
        })
    }
}

/// The store thread's receiving half of a [`lane`] (one receiver: `recv` takes `&mut`).
pub struct LaneRx<T> {
    lane: RxGuard<T>,
    bell: tokio::net::UnixStream,
}

impl<T> LaneRx<T> {
    /// The next value, waiting for one; `None` once every sender is gone and the queue is
    /// empty.
    pub async fn recv(&mut self) -> Option<T> {
        let lane = &self.lane.0;
        loop {
            if let Some(v) = lane.q.pop() {
                return Some(v);
            }
            // Say we wait, then look again: a value pushed before the flag was seen is
            // found here; one pushed after it rings the bell.
            lane.waiting.store(true, Ordering::SeqCst);
            fence(Ordering::SeqCst);
            if let Some(v) = lane.q.pop() {
                lane.waiting.store(false, Ordering::SeqCst);
                return Some(v);
            }
            if lane.closed.load(Ordering::SeqCst) {
                return lane.q.pop();
            }
            if let Err(e) = self.bell.readable().await {
                // Never seen; neither a reason to stop the store thread nor to spin.
                tracing::error!(error = %e, "store queue: cannot wait for its bell; polling");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
            // Drained to WouldBlock, which clears the readiness (a byte left from a ring
            // whose value was already taken costs one more turn, never a lost wake-up).
            let mut buf = [0u8; 64];
            loop {
                match self.bell.try_read(&mut buf) {
                    Ok(n) if n > 0 => {}
                    Err(e) if e.kind() == ErrorKind::Interrupted => {}
                    Ok(_) => break,
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(e) => {
                        tracing::error!(error = %e, "store queue: cannot read its bell; polling");
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        break;
                    }
                }
            }
        }
    }
}

/// The store thread's answers to one shard: unbounded (one per question the shard asked,
/// and the questions are bounded), lock-free, the shard's reply task woken through an
/// `AtomicWaker`.
pub struct Replies<T> {
    q: SegQueue<T>,
    waker: AtomicWaker,
}

impl<T> Default for Replies<T> {
    fn default() -> Self {
        Replies {
            q: SegQueue::new(),
            waker: AtomicWaker::new(),
        }
    }
}

impl<T> Replies<T> {
    /// Delivers one answer (from any thread).
    pub fn push(&self, v: T) {
        self.q.push(v);
        self.waker.wake();
    }

    /// The next answer, or `Pending` with the task's waker kept for [`Replies::push`].
    pub fn poll_pop(&self, cx: &mut Context<'_>) -> Poll<T> {
        if let Some(v) = self.q.pop() {
            return Poll::Ready(v);
        }
        self.waker.register(cx.waker());
        // One pushed between the first look and the registration woke no one.
        match self.q.pop() {
            Some(v) => Poll::Ready(v),
            None => Poll::Pending,
        }
    }
}

impl<T> std::fmt::Debug for Replies<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Replies")
            .field("queued", &self.q.len())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    #[test]
    fn a_lane_keeps_order_and_its_capacity_and_refuses_when_no_one_receives() {
        let (tx, end) = lane::<u32>(4).unwrap();
        runtime().block_on(async {
            let mut rx = end.into_rx().unwrap();
            for i in 0..4 {
                assert!(tx.try_send(i));
            }
            assert!(!tx.try_send(9), "full at its capacity");
            for i in 0..4 {
                assert_eq!(rx.recv().await, Some(i));
            }
            drop(rx);
        });
        // The store thread is gone: a send fails at once (before, it was queued for no one).
        assert!(!tx.try_send(5));
    }

    #[test]
    fn every_value_wakes_a_receiver_that_waits_for_it() {
        // Ping-pong from another thread: each value is sent only once the last one was
        // received, so the receiver waits every time and one lost wake-up fails the test
        // (a sender that keeps sending would hide it behind the next value).
        let (tx, end) = lane::<u32>(4).unwrap();
        let (ack, acked) = mpsc::channel::<u32>();
        let sender = std::thread::spawn(move || {
            for i in 0..20_000 {
                assert!(tx.try_send(i));
                assert_eq!(acked.recv_timeout(Duration::from_secs(5)), Ok(i), "no ack");
            }
            // The last sender leaves while the receiver waits: that wakes it too.
            std::thread::sleep(Duration::from_millis(20));
            drop(tx);
        });
        runtime().block_on(async {
            let mut rx = end.into_rx().unwrap();
            for i in 0..20_000 {
                let got = tokio::time::timeout(Duration::from_secs(5), rx.recv())
                    .await
                    .expect("a wake-up lost");
                assert_eq!(got, Some(i));
                ack.send(i).unwrap();
            }
            let end = tokio::time::timeout(Duration::from_secs(5), rx.recv())
                .await
                .expect("not woken by the last sender leaving");
            assert_eq!(end, None);
        });
        sender.join().unwrap();
    }

    #[test]
    fn every_reply_wakes_the_task_that_waits_for_it() {
        // Ping-pong again, the replies' way, on a glommio executor (a foreign wake).
        let r = Arc::new(Replies::<u32>::default());
        let r2 = r.clone();
        let (ack, acked) = mpsc::channel::<u32>();
        let pusher = std::thread::spawn(move || {
            for i in 0..20_000 {
                r2.push(i);
                assert_eq!(acked.recv_timeout(Duration::from_secs(5)), Ok(i), "no ack");
            }
        });
        let (done, finished) = mpsc::channel();
        let waiter = std::thread::spawn(move || {
            glommio::LocalExecutorBuilder::default()
                .make()
                .unwrap()
                .run(async move {
                    for i in 0..20_000 {
                        let got = std::future::poll_fn(|cx| r.poll_pop(cx)).await;
                        assert_eq!(got, i);
                        ack.send(i).unwrap();
                    }
                });
            done.send(()).unwrap();
        });
        assert!(
            finished.recv_timeout(Duration::from_secs(60)).is_ok(),
            "a reply's wake-up lost"
        );
        pusher.join().unwrap();
        waiter.join().unwrap();
    }
}
