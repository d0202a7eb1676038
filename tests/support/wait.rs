//! Waiting for a condition, always with a deadline (the test kit's).

pub use distproxy_testkit::wait::{poll_until, wait_until};
