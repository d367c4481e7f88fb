//! CPU placement within the process's **allowed** CPU set (`sched_getaffinity`), never by
//! absolute CPU id: under `taskset`, systemd `CPUAffinity=` or a cpuset, "CPU 0" may not be
//! ours. glommio's `Placement::Fixed(n)` takes an absolute id, so shard *i* gets the
//! `first_cpu + i`-th member of the allowed set (STYLE 20).

/// The CPUs this thread may run on (read on the main thread before any pinning: the
/// process's set), ascending. Falls back to `0..available_parallelism` where the set cannot
/// be read.
pub fn allowed() -> Vec<usize> {
    match core_affinity::get_core_ids() {
        Some(ids) if !ids.is_empty() => ids.into_iter().map(|c| c.id).collect(),
        _ => (0..std::thread::available_parallelism().map_or(1, |n| n.get())).collect(),
    }
}

/// Formats a CPU list the way `Cpus_allowed_list` does (`0-3,6`).
pub fn list(cpus: &[usize]) -> String {
    let mut out = Vec::new();
    let mut i = 0;
    while i < cpus.len() {
        let start = cpus[i];
        let mut end = start;
        while i + 1 < cpus.len() && cpus[i + 1] == end + 1 {
            i += 1;
            end = cpus[i];
        }
        out.push(if start == end {
            start.to_string()
        } else {
            format!("{start}-{end}")
        });
        i += 1;
    }
    out.join(",")
}

/// The absolute CPU of executor `i` when executors start at index `first` of `allowed`;
/// `Err` when they do not fit (the caller names its keys).
pub fn pick(allowed: &[usize], first: usize, count: usize, i: usize) -> Result<usize, String> {
    if first + count > allowed.len() {
        return Err(format!(
            "{count} executor(s) from index {first} do not fit the {} CPU(s) this process may use ({})",
            allowed.len(),
            list(allowed)
        ));
    }
    Ok(allowed[first + i])
}

/// How many CPUs' worth of time this process may use: the allowed set's size, lowered to the
/// cgroup's CPU quota where there is one (std's `available_parallelism` reads cgroup v1 and
/// v2 quotas on Linux, rounded down, at least 1). A container with a CPU limit and no cpuset
/// sees every CPU of its node in its allowed set: this is what it may actually use.
pub fn usable() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn indexes_into_the_allowed_set() {
        let allowed = [2, 3, 5, 9];
        assert_eq!(pick(&allowed, 0, 4, 0), Ok(2));
        assert_eq!(pick(&allowed, 1, 3, 2), Ok(9));
        let e = pick(&allowed, 2, 3, 0).unwrap_err();
        assert!(e.contains("2-3,5,9"), "{e}");
        assert_eq!(list(&[0, 1, 2, 4, 6, 7]), "0-2,4,6-7");
    }
}
