//! End-to-end harness: pods emulated as Linux network namespaces on a private
//! bridge, each with its own loopback, address and hosts file, running a
//! distproxy sidecar (or stock `epmd`) and real OTP nodes driven through a
//! small Erlang agent (`tests/erlang/dp_test_agent.erl`).
//!
//! - [`prereq::e2e_enabled`] decides whether an e2e test runs: it fails with
//!   the reason when the machine cannot run it, unless the person running the
//!   tests opted out with `DISTPROXY_SKIP_E2E=1`.
//! - The process guard, waiting with a deadline and certificates come from
//!   the shared test kit (`testkit/`, crate `distproxy_testkit`).
//! - [`Lab`] builds the isolated network and owns everything started in it;
//!   dropping it (also while a test panics) kills every process and deletes
//!   every namespace; namespaces left by a killed run are removed by the next
//!   one. Labs are serialised, across threads and processes: the suite is
//!   heavy and the machine small. [`Lab::new_dual_stack`] gives every pod an
//!   IPv6 address as well (fd00:d157::/64), its name resolving to both.
//! - [`Pod`] starts the sidecar, stock `epmd`, Erlang and Elixir nodes.
//! - [`BeamNode`] talks to one node's agent, one request per line, with a
//!   deadline on every read.
//! - [`mesh`] checks a set of nodes as a whole (concurrent pings, full mesh,
//!   rpc across pods); [`metrics`] reads a sidecar's Prometheus metrics;
//!   [`module`] compiles the `distproxy_epmd` helper module and starts nodes
//!   with it; [`wait`] polls a condition with a deadline.
//! - [`faults`] injects network faults into a pod (loss and delay,
//!   partitions, isolation) and sorts the TCP sockets a sidecar holds by
//!   role, to compare with its metrics.
//! - [`beam_tls`]: certificates and `ssl_dist_optfile`s for nodes of OTP's
//!   own TLS distribution (`-proto_dist inet_tls`), in the lab directory
//!   (which every release's root filesystem sees).
//! - [`fast_path`]: the kernel fast path's scenarios shared by the
//!   fast-path tests and the OTP release matrix.
//! - [`otp`]: the OTP release a node runs ([`Otp`], per pod or per node):
//!   the host's, or another release from a Debian root filesystem built by
//!   `scripts/otp-rootfs.sh`, entered with `chroot` inside the pod.
//!
//! On a failing test the lab prints the tail of every log it kept (sidecar
//! stderr, node output) and leaves its directory in place.
//!
//! Environment: `DISTPROXY_SKIP_E2E=1` skips e2e tests; `DISTPROXY_E2E_BIN`
//! runs another distproxy binary (e.g. a release build) as the sidecar;
//! `DISTPROXY_E2E_KEEP` keeps every lab directory; `DISTPROXY_LOG` sets the
//! sidecar's log filter (default `info,distproxy=debug`).

// Each test binary uses a different subset of the harness.
#![allow(dead_code, unused_imports)]

pub mod beam;
pub mod beam_tls;
pub mod fast_path;
pub mod faults;
pub mod lab;
pub mod mesh;
pub mod metrics;
pub mod module;
pub mod netstat;
pub mod otp;
pub mod prereq;
pub mod process;
pub mod sidecar;
pub mod wait;

pub use beam::{BeamNode, BlobResult};
pub use lab::{Lab, Pod};
pub use otp::Otp;
pub use prereq::e2e_enabled;
pub use sidecar::{Daemon, SidecarOptions};

/// The EPMD port every pod serves.
pub const EPMD_PORT: u16 = 4369;
/// The sidecar's default distribution port, advertised for every local node.
pub const DIST_PORT: u16 = 43691;

/// Overrides the binary under test (e.g. a release build).
pub const BIN_VAR: &str = "DISTPROXY_E2E_BIN";

/// Path of the distproxy binary under test: the one Cargo built for this
/// test run, or `$DISTPROXY_E2E_BIN`.
pub fn distproxy_bin() -> String {
    distproxy_testkit::distproxy_bin!(BIN_VAR)
}
