//! Integration tests on real lab clusters: each test starts its own primary, replica and
//! delay link, and the service on them.

mod harness;

mod api;
mod browser;
mod chromium;
mod cli;
mod faults;
mod grpc;
mod http;
mod lab;
mod probe;
mod proxy;
mod proxy_clients;
mod strategies;
mod token;
