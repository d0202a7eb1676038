//! Waiting for a condition that has no event to wait on, with a deadline.

use std::future::Future;
use std::time::{Duration, Instant};

/// Polls `f` every 20 ms until it returns true or `within` passes.
pub async fn eventually<F, Fut>(within: Duration, mut f: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if f().await {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Calls `cond`, sleeping `every` between calls, until it holds (`true`)
/// or `timeout` has passed since this call (`false`). `cond` is called at
/// least once. Blocking: for harnesses without a runtime.
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
