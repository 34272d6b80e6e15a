//! End-to-end tests: a real `ferry serve` on 127.0.0.1 (ephemeral port, temp root) and the real `ferry push`,
//! with faults injected by the library's proxy or by killing processes.

mod util;

mod access;
mod bad_input;
mod campaign;
mod config;
mod conn_limits;
mod cron;
mod delta;
mod directories;
mod docs;
mod exit_codes;
mod failover;
mod faults;
mod frame_faults;
mod fs_attacks;
mod garage_cluster;
mod gc;
mod hostile_server;
mod limits;
mod msgs;
mod ops;
mod output;
mod pull;
mod push;
mod replay;
mod s3;
mod s3_failover;
mod s3_limits;
mod s3_tree;
mod status;
mod stream_offer;
mod streams;
mod tls;
mod tree;
