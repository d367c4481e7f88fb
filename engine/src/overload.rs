//! Overload shedding at the door: how much new work a shard admits, steered by its event
//! loop's lag and its mesh backlog, AIMD as TCP does. Pure state, fed once per timer tick;
//! the shard applies the fraction (`ShardProxy::set_admission`), logs and counts.
//!
//! Two gears. Refusing at the door costs the shard work (a record read, a parse, a 503
//! written: about a third of a forwarded MESSAGE), so by default it steers loosely: a lag
//! limit of 10 ms, a cut only when two ticks in a row are late, 2 % back per calm tick.
//! Clients doing RFC 7339 overload control drop their share before sending, which costs
//! the shard nothing, so once such clients are connected it steers finely ([`Tick::fine`]):
//! a tighter limit (`limits.overload_control_lag_ms`), a cut on the first late tick and
//! [`FINE_STEP`] back per calm tick, which keeps what it admits within a few milliseconds.

use std::cell::Cell;

/// Admission regained per calm tick: from the floor to everything in half a second.
pub const ADMISSION_STEP: f32 = 0.02;

/// Admission regained per calm tick while clients doing overload control are connected.
pub const FINE_STEP: f32 = 0.005;

/// Admission never falls below this: some new work always gets through, so a shard that
/// has caught up shows it.
pub const MIN_ADMISSION: f32 = 0.02;

/// What one timer tick saw.
#[derive(Debug, Clone, Copy)]
pub struct Tick {
    /// How late the tick woke, in microseconds: how long work waits before it is looked at.
    pub lag_us: u64,
    /// `limits.overload_lag_ms` in microseconds (0: shedding off).
    pub limit_us: u64,
    /// Mesh messages waiting for room in full channels.
    pub backlog: usize,
    /// `server.mesh_capacity`.
    pub mesh_capacity: usize,
    /// Clients doing overload control are connected: refusals are free, steer finely (cut
    /// on the first late tick, [`FINE_STEP`] back).
    pub fine: bool,
}

/// The fraction of new requests a shard admits.
#[derive(Debug)]
pub struct Shedding {
    admitted: Cell<f32>,
    /// The previous tick was over the limit.
    over: Cell<bool>,
}

impl Default for Shedding {
    fn default() -> Self {
        Shedding {
            admitted: Cell::new(1.0),
            over: Cell::new(false),
        }
    }
}

impl Shedding {
    /// The fraction admitted now (1.0: everything; below: overloaded).
    pub fn admitted(&self) -> f32 {
        self.admitted.get()
    }

    /// Feeds one tick. A tick whose lag is past the limit (or whose mesh backlog is past 2×
    /// the channel capacity), after one that was too, cuts the admitted fraction by a
    /// quarter (floor [`MIN_ADMISSION`]): one late tick is one long task, two are a queue. A
    /// tick under half the lag and with at most one channel's worth waiting gives
    /// [`ADMISSION_STEP`] back. In the fine gear ([`Tick::fine`]) the first late tick cuts
    /// and [`FINE_STEP`] is given back. `Some((was, now))` when the fraction changed.
    pub fn observe(&self, t: Tick) -> Option<(f32, f32)> {
        if t.limit_us == 0 {
            return None;
        }
        let was = self.admitted.get();
        let over = t.lag_us > t.limit_us || t.backlog > t.mesh_capacity.saturating_mul(2);
        let previous = self.over.replace(over);
        let standing = over && (previous || t.fine);
        let step = if t.fine { FINE_STEP } else { ADMISSION_STEP };
        let now = if standing {
            (was * 0.75).max(MIN_ADMISSION)
        } else if t.lag_us < t.limit_us / 2 && t.backlog <= t.mesh_capacity {
            (was + step).min(1.0)
        } else {
            was
        };
        if now == was {
            return None;
        }
        self.admitted.set(now);
        Some((was, now))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tick(lag_ms: u64, backlog: usize) -> Tick {
        Tick {
            lag_us: lag_ms * 1000,
            limit_us: 10_000,
            backlog,
            mesh_capacity: 1024,
            fine: false,
        }
    }

    #[test]
    fn with_cooperating_clients_the_first_late_tick_cuts_and_little_comes_back() {
        let s = Shedding::default();
        let fine = |lag_ms| Tick {
            fine: true,
            ..tick(lag_ms, 0)
        };
        assert_eq!(s.observe(fine(50)), Some((1.0, 0.75)), "one late tick cuts");
        assert_eq!(s.observe(fine(50)), Some((0.75, 0.5625)));
        assert_eq!(s.observe(fine(1)), Some((0.5625, 0.5625 + FINE_STEP)));
        // Back to the loose gear (the clients left): one late tick no longer cuts.
        assert_eq!(s.observe(tick(50, 0)), None);
        assert!(s.observe(tick(50, 0)).is_some());
    }

    #[test]
    fn one_late_tick_is_not_a_queue_two_are() {
        let s = Shedding::default();
        assert_eq!(s.observe(tick(50, 0)), None);
        assert_eq!(
            s.observe(tick(1, 0)),
            None,
            "calm at full admission: no change"
        );
        assert_eq!(s.observe(tick(50, 0)), None);
        assert_eq!(s.observe(tick(50, 0)), Some((1.0, 0.75)));
        assert_eq!(s.observe(tick(50, 0)), Some((0.75, 0.5625)));
    }

    #[test]
    fn a_mesh_backlog_past_twice_the_channel_is_overload_too() {
        let s = Shedding::default();
        s.observe(tick(0, 2049));
        assert_eq!(s.observe(tick(0, 2049)), Some((1.0, 0.75)));
        // Between one and two channels' worth: hold, neither cut nor given back.
        assert_eq!(s.observe(tick(0, 1500)), None);
        assert_eq!(s.admitted(), 0.75);
    }

    #[test]
    fn it_never_admits_less_than_the_floor_and_recovers_in_half_a_second() {
        let s = Shedding::default();
        for _ in 0..100 {
            s.observe(tick(100, 0));
        }
        assert_eq!(s.admitted(), MIN_ADMISSION);
        // Between half the limit and the limit: hold.
        assert_eq!(s.observe(tick(7, 0)), None);
        let mut ticks = 0;
        while s.admitted() < 1.0 {
            assert!(s.observe(tick(1, 0)).is_some());
            ticks += 1;
        }
        assert!(
            ticks <= 50,
            "{ticks} ticks of 10 ms to admit everything again"
        );
    }

    #[test]
    fn a_zero_limit_never_sheds() {
        let s = Shedding::default();
        for _ in 0..10 {
            let t = Tick {
                limit_us: 0,
                ..tick(1000, 100_000)
            };
            assert_eq!(s.observe(t), None);
        }
        assert_eq!(s.admitted(), 1.0);
    }
}
