//! Host probes run before any executor starts, so a misconfigured host gets a clear message
//! and a fix instead of glommio's misleading panic ("kernel should be at least 5.8").

/// Can this process create an io_uring? `Err` carries the reason and the fix.
pub fn io_uring() -> Result<(), String> {
    let mut params = [0u8; 120]; // struct io_uring_params (120 bytes), zeroed
    // SAFETY: io_uring_setup(entries, params) reads and writes at most
    // sizeof(struct io_uring_params) = 120 bytes through the pointer, which points to a live,
    // writable 120-byte buffer for the whole call.
    let fd = unsafe { libc::syscall(libc::SYS_io_uring_setup, 4u32, params.as_mut_ptr()) };
    if fd >= 0 {
        // SAFETY: `fd` is a descriptor io_uring_setup just returned to us; we close it once.
        unsafe { libc::close(fd as i32) };
        return Ok(());
    }
    let err = std::io::Error::last_os_error();
    Err(match err.raw_os_error() {
        Some(libc::ENOSYS) => "io_uring is not available in this kernel (need Linux >= 5.8 with CONFIG_IO_URING)".into(),
        Some(libc::EPERM) => "io_uring is disabled: set `sysctl kernel.io_uring_disabled=0` (or allow io_uring_setup in the seccomp profile of the container)".into(),
        Some(libc::ENOMEM) => "io_uring_setup failed for lack of locked memory: raise the memlock limit (systemd: LimitMEMLOCK=infinity; shell: ulimit -l unlimited)".into(),
        _ => format!("io_uring_setup failed: {err}"),
    })
}

/// Is the system clock synchronised (NTP/PTP, as the kernel knows it)? `None` when the
/// kernel does not say. Certificate validity, CRL due dates and the cluster's absolute
/// binding expiries all read this clock.
pub fn clock_synced() -> Option<bool> {
    // SAFETY: an all-zero `struct timex` is a valid value (it is plain data); with `modes`
    // 0 adjtimex only reads the kernel's clock state into the struct the pointer names,
    // which lives on this stack frame for the whole call.
    let mut t: libc::timex = unsafe { std::mem::zeroed() };
    // SAFETY: see above.
    let state = unsafe { libc::adjtimex(&mut t) };
    match state {
        -1 => None,
        // TIME_ERROR: the clock is not synchronised (STA_UNSYNC, or the NTP daemon stopped
        // telling the kernel).
        libc::TIME_ERROR => Some(false),
        _ => Some(t.status & libc::STA_UNSYNC == 0),
    }
}

/// The soft and hard RLIMIT_MEMLOCK in bytes (`u64::MAX` = unlimited).
pub fn memlock() -> (u64, u64) {
    rlimit(libc::RLIMIT_MEMLOCK)
}

/// The soft and hard RLIMIT_NOFILE.
pub fn nofile() -> (u64, u64) {
    rlimit(libc::RLIMIT_NOFILE)
}

fn rlimit(which: libc::__rlimit_resource_t) -> (u64, u64) {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one `struct rlimit` through the pointer, which points to a
    // live local of exactly that type.
    let rc = unsafe { libc::getrlimit(which, &mut r) };
    if rc != 0 {
        return (0, 0);
    }
    let conv = |v: libc::rlim_t| {
        if v == libc::RLIM_INFINITY {
            u64::MAX
        } else {
            v
        }
    };
    (conv(r.rlim_cur), conv(r.rlim_max))
}

/// Raises the soft limit of `which` to the hard limit; returns the new soft limit.
fn raise(which: libc::__rlimit_resource_t) -> u64 {
    let (_, hard) = rlimit(which);
    let hard_raw = if hard == u64::MAX {
        libc::RLIM_INFINITY
    } else {
        hard
    };
    let r = libc::rlimit {
        rlim_cur: hard_raw,
        rlim_max: hard_raw,
    };
    // SAFETY: setrlimit only reads one `struct rlimit` through the pointer, a live local.
    unsafe { libc::setrlimit(which, &r) };
    rlimit(which).0
}

/// Raises the soft file and memlock limits to their hard limits (as far as allowed).
pub fn raise_limits() -> (u64, u64) {
    (raise(libc::RLIMIT_NOFILE), raise(libc::RLIMIT_MEMLOCK))
}

/// Locked memory glommio needs for `shards` executors (measured: at least 512 KiB each).
pub fn memlock_needed(shards: usize) -> u64 {
    shards as u64 * 512 * 1024
}

/// Checks io_uring and locked memory for `shards` executors; `Err` says what to fix.
pub fn preflight(shards: usize) -> Result<(), String> {
    io_uring()?;
    let (soft, _) = memlock();
    if soft < memlock_needed(shards) {
        return Err(format!(
            "locked-memory limit is {} KiB but {shards} shards need {} KiB: raise LimitMEMLOCK (systemd) or `ulimit -l` (see tuning/limits.conf)",
            soft / 1024,
            memlock_needed(shards) / 1024
        ));
    }
    Ok(())
}
