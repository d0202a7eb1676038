//! Child processes that cannot outlive their owner: the test kit's guard.
//! The [`Lab`](super::Lab) additionally kills whatever is left in its
//! namespaces, so a panicking test leaves nothing running.

pub use distproxy_testkit::process::Proc;
