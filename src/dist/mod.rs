//! The distribution port: routing incoming connections to local nodes.

pub mod handshake;
pub mod listener;
pub mod mirror;
pub mod relay;
pub mod router;
