//! The VMM process (`evoke vmm`'s arguments) with its tracing events on
//! stderr at the level EVOKE_LOG names (default `debug`): for profiling the
//! set-up phases without building the whole evoke binary.
//!
//! `cargo build --release -p evoke-vmm --example vmm_trace`

use std::process::ExitCode;

fn main() -> ExitCode {
    let level = std::env::var("EVOKE_LOG")
        .ok()
        .and_then(|l| l.parse().ok())
        .unwrap_or(tracing_subscriber::filter::LevelFilter::DEBUG);
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_max_level(level)
        .init();
    let mut args = std::env::args_os().skip(1).peekable();
    if args.peek().is_some_and(|a| a == "vmm") {
        args.next();
    }
    ExitCode::from(evoke_vmm::cli::main("vmm_trace", args))
}
