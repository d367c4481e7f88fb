//! Child processes a tool starts (the load generator's demo runs the `sipring` binary): the
//! signal that asks one to stop, and its end with ours.

use std::io;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command};

/// Sends SIGTERM to `child` (sipring drains and exits 0 on it).
pub fn terminate(child: &Child) -> io::Result<()> {
    let pid =
        libc::pid_t::try_from(child.id()).map_err(|_| io::Error::other("pid out of range"))?;
    // SAFETY: kill(2) reads no memory of ours. `pid` is our own child's and the caller holds
    // its `Child` unreaped, so the pid cannot have been given to another process.
    if unsafe { libc::kill(pid, libc::SIGTERM) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Has the process `cmd` starts receive SIGTERM when the thread that spawns it ends (the
/// tool exited, or was killed by a signal it does not catch), so that it is not left running
/// with its ports bound. Spawn from a thread that lives as long as the child should.
pub fn end_with_parent(cmd: &mut Command) -> &mut Command {
    // SAFETY: the closure runs in the child between fork and exec, where only
    // async-signal-safe calls are allowed: prctl(2) and getppid(2) are plain system calls
    // that take no lock, the closure captures nothing, and its errors are raw OS error
    // codes (an `io::Error` made from a message would allocate, which after fork in a
    // multi-threaded parent can deadlock on the allocator's lock).
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) == -1 {
                return Err(io::Error::last_os_error());
            }
            // The parent may have gone between fork and prctl: then nobody will signal us.
            if libc::getppid() == 1 {
                return Err(io::Error::from_raw_os_error(libc::ESRCH));
            }
            Ok(())
        })
    }
}
