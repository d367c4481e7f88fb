//! Overload shedding at the door: how much new work a shard admits, steered by its event
//! loop's lag and its mesh backlog, AIMD as TCP does. Pure state, fed once per timer tick;
//! the shard applies the fraction (`ShardProxy::set_admission`), logs and counts.
//!
//! Two gears. Refusing at the door costs the shard work (a record read, a parse, a 503
//! written: about a third of a forwarded MESSAGE), so by default it steers loosely: a lag
//! limit of 10 ms, a cut only when two ticks in a row are late, 2 % back per calm tick.
//! Clients doing RFC 7339 overload control drop their share before sending, which costs
//! the shard nothing, so while such clients are connected an overloaded shard steers finely
//! ([`Tick::fine_limit_us`]): a tighter limit (`limits.overload_control_lag_ms`), a cut on
//! the first late tick and [`FINE_STEP`] back per calm tick, which keeps what it admits
//! within a few milliseconds. It does so only while most new requests reaching its door
//! come from such clients ([`FINE_MIN_SHARE`]): where they are few, refusals still cost. Shedding still starts only by the loose rule: a shard
//! admitting everything does not start refusing on one late millisecond of a noisy host; and
//! the fine gear needs the shard to be busy with messages ([`FINE_MIN_WORK`]): once the
//! load is gone, a late tick is the host's noise, judged loosely, and the shard recovers.

use std::cell::Cell;

/// Admission regained per calm tick: from the floor to everything in half a second.
pub const ADMISSION_STEP: f32 = 0.02;

/// Admission regained per calm tick while clients doing overload control are connected, for
/// the first [`FINE_TICKS`] calm ticks in a row; [`ADMISSION_STEP`] after them, so a shard
/// whose overload ended (or whose last cut was a noisy host's late tick) recovers within
/// about a second.
pub const FINE_STEP: f32 = 0.005;

/// Calm ticks in a row (500 ms) after which the fine gear gives back [`ADMISSION_STEP`]:
/// under a sustained overload a cut comes sooner (+25 % admitted without one is not a steady
/// state), so this only speeds up the recovery once the overload is over.
pub const FINE_TICKS: u32 = 50;

/// Messages per tick (averaged over the last few ticks) below which the fine gear does not apply: a shard
/// this quiet is not queueing requests, whatever its timer says.
pub const FINE_MIN_WORK: f32 = 2.0;

/// Share of new requests at the door (a short average) that must come from clients doing
/// overload control for the fine gear.
pub const FINE_MIN_SHARE: f32 = 0.5;

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
    /// Overload control is on: once shedding, busy, and with most new requests from
    /// clients doing it, steer finely against this lag limit (cut on the first late tick,
    /// [`FINE_STEP`] back). `None`: loosely.
    pub fine_limit_us: Option<u64>,
    /// New requests that reached the door since the previous tick (while shedding), and
    /// how many of them came from clients doing overload control.
    pub door: (u32, u32),
    /// SIP messages the shard handled since the previous tick.
    pub work: u32,
}

/// The fraction of new requests a shard admits.
#[derive(Debug)]
pub struct Shedding {
    admitted: Cell<f32>,
    /// The previous tick was over the limit.
    over: Cell<bool>,
    /// Calm ticks in a row (under half the limit, no backlog).
    calm: Cell<u32>,
    /// Messages per tick, an average that forgets in a few ticks.
    busy: Cell<f32>,
    /// Share of new requests at the door from clients doing overload control, likewise.
    cooperative: Cell<f32>,
}

impl Default for Shedding {
    fn default() -> Self {
        Shedding {
            admitted: Cell::new(1.0),
            over: Cell::new(false),
            calm: Cell::new(0),
            busy: Cell::new(0.0),
            cooperative: Cell::new(0.0),
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
    /// [`ADMISSION_STEP`] back. In the fine gear ([`Tick::fine_limit_us`], only while
    /// already shedding) the limit is the fine one, the first late tick cuts and
    /// [`FINE_STEP`] is given back. `Some((was, now))` when the fraction changed.
    pub fn observe(&self, t: Tick) -> Option<(f32, f32)> {
        if t.limit_us == 0 {
            return None;
        }
        let was = self.admitted.get();
        let busy = self.busy.get() * 0.7 + t.work as f32 * 0.3;
        self.busy.set(busy);
        let (new, coop) = t.door;
        if new > 0 {
            let share = coop as f32 / new as f32;
            self.cooperative
                .set(self.cooperative.get() * 0.7 + share * 0.3);
        }
        let fine = t.fine_limit_us.filter(|_| {
            was < 1.0 && busy >= FINE_MIN_WORK && self.cooperative.get() >= FINE_MIN_SHARE
        });
        let limit_us = fine.unwrap_or(t.limit_us);
        let over = t.lag_us > limit_us || t.backlog > t.mesh_capacity.saturating_mul(2);
        let previous = self.over.replace(over);
        let standing = over && (previous || fine.is_some());
        let calm = t.lag_us < limit_us / 2 && t.backlog <= t.mesh_capacity;
        // Saturating: a shard calm for 2^32 ticks (497 days) would otherwise overflow it.
        let run = if calm {
            self.calm.get().saturating_add(1)
        } else {
            0
        };
        self.calm.set(run);
        let step = if fine.is_some() && run <= FINE_TICKS {
            FINE_STEP
        } else {
            ADMISSION_STEP
        };
        let now = if standing {
            (was * 0.75).max(MIN_ADMISSION)
        } else if calm {
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
            fine_limit_us: None,
            door: (0, 0),
            work: 0,
        }
    }

    #[test]
    fn with_cooperating_clients_a_busy_shedding_shard_steers_finely() {
        let s = Shedding::default();
        let fine = |lag_us| Tick {
            lag_us,
            fine_limit_us: Some(1000),
            door: (20, 20),
            work: 50,
            ..tick(0, 0)
        };
        // Admitting everything, a late millisecond (or one late tick) starts nothing: the
        // loose rule decides when shedding starts.
        assert_eq!(s.observe(fine(5_000)), None);
        assert_eq!(s.observe(fine(200)), None);
        assert_eq!(s.observe(fine(50_000)), None);
        assert_eq!(s.observe(fine(50_000)), Some((1.0, 0.75)));
        // Shedding: the fine limit, the first late tick cuts, little comes back.
        assert_eq!(s.observe(fine(1_500)), Some((0.75, 0.5625)));
        assert_eq!(
            s.observe(fine(800)),
            None,
            "between half the limit and it: hold"
        );
        assert_eq!(s.observe(fine(100)), Some((0.5625, 0.5625 + FINE_STEP)));
        // Calm for long (the overload ended): back at the loose pace, all within a second.
        let mut ticks = 1;
        while s.admitted() < 1.0 {
            s.observe(fine(100));
            ticks += 1;
        }
        assert!(ticks <= 100, "{ticks} ticks of 10 ms to recover");
        s.observe(fine(50_000));
        assert_eq!(s.observe(fine(50_000)), Some((1.0, 0.75)));
        // The clients left: the loose gear again, one late tick no longer cuts.
        s.observe(tick(1, 0));
        assert_eq!(s.observe(tick(50, 0)), None);
        assert!(s.observe(tick(50, 0)).is_some());
    }

    #[test]
    fn where_few_new_requests_come_from_cooperating_clients_the_gear_stays_loose() {
        // One partner link doing overload control among many phones: refusals at the door
        // still cost, so a late millisecond is not a reason to refuse more of the phones.
        let s = Shedding::default();
        let t = |lag_us| Tick {
            lag_us,
            fine_limit_us: Some(1000),
            door: (100, 5),
            work: 100,
            ..tick(0, 0)
        };
        s.observe(t(50_000));
        assert_eq!(s.observe(t(50_000)), Some((1.0, 0.75)));
        assert_eq!(s.observe(t(3_000)), Some((0.75, 0.77)), "3 ms: calm, loose");
    }

    #[test]
    fn a_quiet_shard_is_judged_loosely_even_with_cooperating_clients() {
        // The overload is over (a few messages a tick) but the host is noisy (late
        // milliseconds): the shard recovers as the loose rule would, at 2 % a tick.
        let s = Shedding::default();
        let t = |lag_us, work| Tick {
            lag_us,
            fine_limit_us: Some(1000),
            door: (work, work),
            work,
            ..tick(0, 0)
        };
        for _ in 0..5 {
            s.observe(t(50_000, 100));
        }
        assert!(s.admitted() < 0.5);
        assert!(s.observe(t(3_000, 100)).is_some(), "busy: 3 ms is late");
        let mut ticks = 0;
        while s.admitted() < 1.0 && ticks < 200 {
            s.observe(t(3_000, 0));
            ticks += 1;
        }
        assert!(ticks <= 70, "{ticks} ticks of 10 ms to recover");
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
