//! Helpers shared by the server's integration tests.

pub mod http;
pub mod raw_ws;
pub mod turn_client;
