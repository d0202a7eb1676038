//! The system under test: every path of the distproxy library that tests and
//! benches use, in one place. When a module of the library moves, this file
//! changes and the tests do not.

pub use distproxy::acl;
pub use distproxy::client;
pub use distproxy::config::{self, Config, LoopbackLookups, Millis};
pub use distproxy::distribution::handshake::{self, Challenge, SendName, Status};
pub use distproxy::epmd::proto::{self, EgressReply, NodeSpec, Port2Reply, Request};
pub use distproxy::log_safe::Throttle;
pub use distproxy::metrics;
pub use distproxy::remsh;
pub use distproxy::sidecar::{self, Sidecar};
pub use distproxy::tunnel::preamble::{self, Preamble};
pub use distproxy::tunnel::tls;
