//! Helpers shared by the store's integration tests.

use std::process::Child;
use std::time::{Duration, Instant};

/// Signals a child this test started and waits for it to exit, killing it after a deadline.
pub fn stop_child(child: &mut Option<Child>, signal: libc::c_int) {
    let Some(mut child) = child.take() else { return };
    let pid = libc::pid_t::try_from(child.id()).expect("pid");
    // SAFETY: plain syscall; `pid` is our own child, not yet reaped.
    unsafe { libc::kill(pid, signal) };
    let deadline = Instant::now() + Duration::from_secs(20);
    while child.try_wait().ok().flatten().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
