//! All integration tests, compiled into one binary (as ripgrep does); each
//! module is one area. They run against real PostgreSQL servers.

mod util;

mod demo;
mod faults;
mod fuzz;
mod harness;
mod inspect;
mod lifecycle;
mod netfault;
mod ops;
mod protocol;
mod safety;
mod serve;
mod soak;
mod standby;
mod stream;
mod sync;
mod twohosts;
mod wake;
