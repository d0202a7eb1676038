//! The EPMD side of distproxy. Protocol reference: the "Distribution
//! Protocol" guide of OTP (`erts/doc/guides/erl_dist_protocol.md`) and the
//! reference server `erts/epmd/src/epmd_srv.c`.

pub mod cli;
pub mod codec;
pub mod proto;
pub mod registry;
pub mod server;
pub mod state;
