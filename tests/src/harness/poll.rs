//! The one way tests wait for a condition: poll it until it holds or a deadline passes,
//! never a fixed sleep where a condition can be awaited.

use std::time::{Duration, Instant};

/// How often [`wait_for`] looks.
pub const POLL: Duration = Duration::from_millis(50);

/// Calls `f` every [`POLL`] until it returns `Some`, for at most `timeout`; panics naming
/// `what` (and `f`'s last `None`-time state is the caller's to print) if it never does.
pub fn wait_for<T>(timeout: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    try_wait_for(timeout, &mut f).unwrap_or_else(|| panic!("{what}: not within {timeout:?}"))
}

/// Like [`wait_for`], but `None` when the time is up.
pub fn try_wait_for<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(t) = f() {
            return Some(t);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(POLL);
    }
}
