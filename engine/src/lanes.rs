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
use std::io::Write;
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering, fence};
use std::task::{Context, Poll};

struct Lane<T> {
    q: ArrayQueue<T>,
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
        if self.waiting.swap(false, Ordering::SeqCst) {
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
        waiting: AtomicBool::new(false),
        senders: AtomicUsize::new(1),
        closed: AtomicBool::new(false),
        bell: w,
    });
    Ok((LaneTx(lane.clone()), LaneEnd { lane, bell: r }))
}

/// The sending half of a [`lane`].
pub struct LaneTx<T>(Arc<Lane<T>>);

impl<T> LaneTx<T> {
    /// Queues `v`; false (and `v` dropped) when the queue is full.
    pub fn try_send(&self, v: T) -> bool {
        if self.0.q.push(v).is_err() {
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
    lane: Arc<Lane<T>>,
    bell: UnixStream,
}

impl<T> LaneEnd<T> {
    /// The receiver, registered with the current tokio runtime (call inside it).
    pub fn into_rx(self) -> std::io::Result<LaneRx<T>> {
        Ok(LaneRx {
            lane: self.lane,
            bell: tokio::net::UnixStream::from_std(self.bell)?,
        })
    }
}

/// The store thread's receiving half of a [`lane`].
pub struct LaneRx<T> {
    lane: Arc<Lane<T>>,
    bell: tokio::net::UnixStream,
}

impl<T> LaneRx<T> {
    /// The next value, waiting for one; `None` once every sender is gone and the queue is
    /// empty.
    pub async fn recv(&self) -> Option<T> {
        loop {
            if let Some(v) = self.lane.q.pop() {
                return Some(v);
            }
            // Say we wait, then look again: a value pushed before the flag was seen is
            // found here; one pushed after it rings the bell.
            self.lane.waiting.store(true, Ordering::SeqCst);
            fence(Ordering::SeqCst);
            if let Some(v) = self.lane.q.pop() {
                self.lane.waiting.store(false, Ordering::SeqCst);
                return Some(v);
            }
            if self.lane.closed.load(Ordering::SeqCst) {
                return self.lane.q.pop();
            }
            if self.bell.readable().await.is_err() {
                return None;
            }
            let mut buf = [0u8; 64];
            while matches!(self.bell.try_read(&mut buf), Ok(n) if n > 0) {}
        }
    }
}

/// The store thread's answers to one shard: unbounded (the shard asked for each and holds
/// its request), lock-free, and the shard's reply task woken through an `AtomicWaker`.
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

    #[test]
    fn a_lane_delivers_in_order_wakes_a_waiting_receiver_and_ends_with_its_senders() {
        let (tx, end) = lane::<u32>(4).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let rx = end.into_rx().unwrap();
            for i in 0..4 {
                assert!(tx.try_send(i));
            }
            assert!(!tx.try_send(9), "full at its capacity");
            for i in 0..4 {
                assert_eq!(rx.recv().await, Some(i));
            }
            // A sender on another thread, after the receiver waits: the bell wakes it.
            let tx2 = tx.clone();
            let t = std::thread::spawn(move || {
                std::thread::sleep(std::time::Duration::from_millis(50));
                for i in 10..1010 {
                    while !tx2.try_send(i) {
                        std::thread::yield_now();
                    }
                }
            });
            for i in 10..1010 {
                let got = tokio::time::timeout(std::time::Duration::from_secs(5), rx.recv())
                    .await
                    .expect("woken");
                assert_eq!(got, Some(i));
            }
            t.join().unwrap();
            drop(tx);
            let end = tokio::time::timeout(std::time::Duration::from_secs(5), rx.recv())
                .await
                .expect("woken by the last sender leaving");
            assert_eq!(end, None);
        });
    }

    #[test]
    fn replies_wake_the_task_that_waits_for_them() {
        let r = Arc::new(Replies::<u32>::default());
        let r2 = r.clone();
        let t = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(50));
            for i in 0..100 {
                r2.push(i);
            }
        });
        let got: Vec<u32> = futures_lite::future::block_on(async {
            let mut v = Vec::new();
            while v.len() < 100 {
                v.push(std::future::poll_fn(|cx| r.poll_pop(cx)).await);
            }
            v
        });
        assert_eq!(got, (0..100).collect::<Vec<_>>());
        t.join().unwrap();
    }
}
