//! The open-files limit (RLIMIT_NOFILE), which caps how many connections a server can hold:
//! every connection is a file descriptor. Systemd and most shells start processes with a soft
//! limit of 1,024 and a far higher hard limit, which any process may raise its soft limit to.

use std::io;

/// The soft and hard open-files limits of this process.
fn get() -> io::Result<libc::rlimit> {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes one rlimit through a valid pointer.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(limit)
}

/// The soft open-files limit in force, or 0 if it cannot be read.
pub(crate) fn current() -> u64 {
    get().map_or(0, |l| l.rlim_cur)
}

/// Sets the soft open-files limit to `wanted` (gearmand's `--file-descriptors`), raising the
/// hard limit too if `wanted` is above it (which takes CAP_SYS_RESOURCE, which root has unless
/// a container drops it, and is bounded by the kernel's `fs.nr_open`); with `None`, raises the
/// soft limit to the hard limit. Returns the soft limit before and after, in files.
///
/// Errors: the limit cannot be read, or `wanted` cannot be had: the message names the hard
/// limit and what would help.
pub fn set(wanted: Option<u64>) -> io::Result<(u64, u64)> {
    let limit = get()?;
    let before = limit.rlim_cur;
    let target = wanted.unwrap_or(limit.rlim_max);
    if target == before {
        return Ok((before, before));
    }
    let new = libc::rlimit { rlim_cur: target, rlim_max: limit.rlim_max.max(target) };
    // SAFETY: setrlimit reads one rlimit through a valid pointer.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &new) } != 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(
            e.kind(),
            format!(
                "cannot set the open-files limit to {target} (now {before}, hard limit {}): {e}; above the \
                 hard limit it takes CAP_SYS_RESOURCE (root, unless a container drops it) and at most the \
                 kernel's fs.nr_open; or raise the hard limit (ulimit -Hn, systemd's LimitNOFILE=)",
                limit.rlim_max
            ),
        ));
    }
    Ok((before, target))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One test changes the limit (tests run on threads of one process), and puts it back.
    #[test]
    fn set_raises_to_the_hard_limit_and_refuses_the_impossible() {
        let original = get().unwrap();
        let lower = original.rlim_max.min(512);
        assert_eq!(set(Some(lower)).unwrap(), (original.rlim_cur, lower));
        assert_eq!(current(), lower);
        assert_eq!(set(None).unwrap(), (lower, original.rlim_max));
        assert_eq!(current(), original.rlim_max);
        // Above fs.nr_open, not even root can go.
        let nr_open: u64 = std::fs::read_to_string("/proc/sys/fs/nr_open").unwrap().trim().parse().unwrap();
        let err = set(Some(nr_open + 1)).unwrap_err();
        assert!(err.to_string().contains("cannot set the open-files limit"), "{err}");
        assert_eq!(get().unwrap().rlim_max, original.rlim_max);
        // SAFETY: as above; restores the limits the test started with.
        assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &original) }, 0);
    }
}
