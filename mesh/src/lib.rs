//! Shared library of the mesh: HBONE, identity and TLS, the socket factory, metrics and admin.
#![deny(rust_2018_idioms)]

pub mod admin;
pub mod ca;
pub mod ca_client;
pub mod certs;
pub mod control;
pub mod drain;
pub mod hbone;
pub mod identity;
pub mod memory;
pub mod metrics;
pub mod proto;
pub mod socket;
pub mod state;
pub mod tls;
pub mod xds;
