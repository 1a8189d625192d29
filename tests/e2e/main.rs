//! End-to-end tests: they drive the real `distill` binary against a scratch
//! directory and inspect what it printed and what it recorded.

mod common;
mod curate;
mod evaluate;
mod foundation;
mod generate;
mod grpo;
mod import;
mod model;
mod processes;
mod quickstart;
mod serve;
mod train;
