//! Waiting for a condition, always with a deadline.

use std::time::{Duration, Instant};

/// Calls `cond`, sleeping `every` between calls, until it holds (`true`)
/// or `timeout` has passed since this call (`false`). `cond` is called at
/// least once.
pub fn poll_until(timeout: Duration, every: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(every);
    }
}

/// Polls `cond` every 100 ms until it holds, or panics after `timeout`
/// saying it was waiting for `what`.
pub fn wait_until(timeout: Duration, what: &str, cond: impl FnMut() -> bool) {
    assert!(
        poll_until(timeout, Duration::from_millis(100), cond),
        "timed out after {timeout:?} waiting for {what}"
    );
}
