//! What distproxy's integration tests and benches share, in one dev-only
//! crate (a dev-dependency of `distproxy`, never shipped):
//!
//! - [`sut`]: the library paths the tests use, re-exported in one place, so
//!   that moving a module of the library is a one-line change here.
//! - [`sidecar`]: an in-process sidecar on `127.0.0.1:0` and its test
//!   configurations; [`node`]: a fake BEAM node; [`peer`]: playing a remote
//!   node or a node's EPMD client (dial-as, egress requests, raw exchanges);
//!   [`frames`]: the handshake frames those send.
//! - [`certs`]: a CA and leaves (rcgen) in Kubernetes-style secret folders.
//! - [`process`]: child processes killed with their process group on drop;
//!   [`ports`]: port discovery; [`wait`]: polling with a deadline.
//! - [`bench`]: what the relay and tunnel benches share (a threaded fake node,
//!   a distproxy process, ping-pong, table arithmetic).
//!
//! The end-to-end harness (network-namespace pods, real BEAM nodes) stays in
//! `tests/support/`, built on this crate's [`process`] guard.
//!
//! The path of the distproxy binary is only known to the crate under test
//! (`CARGO_BIN_EXE_distproxy`): [`distproxy_bin!`] expands there.

pub mod bench;
pub mod certs;
pub mod frames;
pub mod node;
pub mod peer;
pub mod ports;
pub mod process;
pub mod sidecar;
pub mod sut;
pub mod wait;

/// The distproxy binary Cargo built for the calling test or bench, or the
/// program named by the environment variable given as argument when it is
/// set and not empty (to run another build, e.g. a release binary).
#[macro_export]
macro_rules! distproxy_bin {
    () => {
        env!("CARGO_BIN_EXE_distproxy").to_string()
    };
    ($override_var:expr) => {
        $crate::process::program_or_override($override_var, env!("CARGO_BIN_EXE_distproxy"))
    };
}

/// The in-process helpers most integration tests use:
/// `use distproxy_testkit::prelude::*;`.
pub mod prelude {
    pub use crate::frames;
    pub use crate::node::{FakeNode, FakePod};
    pub use crate::peer::{
        closed_by_timeout, closed_without_reply, dial_as, egress, egress_port, granted_port,
        lookup_port, raw_exchange, read_node_answer,
    };
    pub use crate::sidecar::{
        dist_addr, epmd_addr, loopback, proxy_config, spec, start, test_config,
    };
    pub use crate::sut::Millis;
    pub use crate::wait::eventually;
}
