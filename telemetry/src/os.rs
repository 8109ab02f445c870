//! Operating-system calls the servers need, with no safe wrapper in the standard library:
//! raising the open-files limit, giving freed heap back, and capping a worker's address space.
#![allow(unsafe_code)] // setrlimit/getrlimit and malloc_trim: libc calls, reasons at each one

/// The open-files limit before and after [`raise_nofile_limit`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NofileLimit {
    /// Soft limit found at start.
    pub before: u64,
    /// Soft limit now.
    pub now: u64,
    /// Hard limit (the ceiling an unprivileged process may raise its soft limit to).
    pub hard: u64,
}

/// Raises the soft open-files limit to the hard limit (many distributions start services
/// with 1,024 soft, far below what a server of connections needs). `None` where the limit
/// cannot be read.
#[allow(clippy::unnecessary_cast)] // rlim_t is u64 on 64-bit Linux, narrower elsewhere
pub fn raise_nofile_limit() -> Option<NofileLimit> {
    #[cfg(unix)]
    {
        let mut l = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit writes one rlimit struct we own.
        if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut l) } != 0 {
            return None;
        }
        let before = l.rlim_cur as u64;
        let hard = l.rlim_max as u64;
        if l.rlim_cur < l.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: l.rlim_max,
                rlim_max: l.rlim_max,
            };
            // SAFETY: setrlimit reads one rlimit struct we own.
            if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
                l.rlim_cur = l.rlim_max;
            }
        }
        Some(NofileLimit {
            before,
            now: l.rlim_cur as u64,
            hard,
        })
    }
    #[cfg(not(unix))]
    {
        None
    }
}

/// Caps this process' address space at `bytes` (soft and hard): an allocation beyond it fails,
/// and Rust aborts with "memory allocation of N bytes failed". For worker processes that run
/// user-supplied queries (analytics jobs); a no-op where there is no setrlimit.
#[allow(clippy::unnecessary_cast)] // rlim_t is u64 on 64-bit Linux, narrower elsewhere
pub fn limit_address_space(bytes: u64) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        let lim = libc::rlimit {
            rlim_cur: bytes as libc::rlim_t,
            rlim_max: bytes as libc::rlim_t,
        };
        // SAFETY: setrlimit reads one rlimit struct we own.
        if unsafe { libc::setrlimit(libc::RLIMIT_AS, &lim) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    #[cfg(not(unix))]
    let _ = bytes;
    Ok(())
}

/// Gives freed heap pages back to the operating system. glibc keeps what its arenas freed,
/// so without this the resident size stays at a flood's peak after the flood is gone. Takes
/// milliseconds on a large heap: call it from a blocking thread, not per message.
pub fn release_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim walks glibc's own arenas; it takes no pointer of ours.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::expect_used)]
    use super::*;

    #[test]
    fn nofile_limit_is_raised_to_the_hard_limit() {
        let l = raise_nofile_limit().expect("readable on unix");
        assert_eq!(l.now, l.hard.min(l.now.max(l.before)), "{l:?}");
        assert!(l.now >= l.before, "{l:?}");
        assert_eq!(raise_nofile_limit().map(|l| l.before), Some(l.now));
        release_memory();
    }
}
