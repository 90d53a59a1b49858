//! The per-node L4 proxy: in-pod listeners, HBONE between nodes, L4 authorization.
#![deny(rust_2018_idioms)]

pub mod admin;
pub mod authorization;
pub mod baggage;
pub mod claims;
pub mod connections;
pub mod cores;
pub mod dns;
pub mod handover;
pub mod inbound;
pub mod inpod;
pub mod label_sets;
pub mod local_config;
pub mod metrics;
pub mod netlink;
pub mod node;
pub mod outbound;
pub mod redirect;
pub mod selfloop;
pub mod source;
pub mod xds;
