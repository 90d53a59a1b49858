//! Delta ADS for the node proxies: the per-connection state machine (`session`) and the tonic service around it (`server`).

pub mod server;
pub mod session;
