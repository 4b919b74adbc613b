//! `evoke vmm` (hidden): the microVM monitor process. The microvm tier starts
//! one per VM with `--config`; the flags serve benchmarks and debugging.
//!
//! [`fast_path`] runs it before clap and the full logging setup: every VM
//! has one such process, and its memory overhead beside guest RAM is
//! benchmarked. Parsing evoke's whole command tree and building an
//! EnvFilter would touch megabytes of the binary's code that stay resident
//! in every VMM. The arguments are [`evoke_vmm::cli`]'s, shared with the
//! small `evoke-vmm` binary.

use std::ffi::OsString;
use std::process::ExitCode;

use crate::Global;

#[derive(clap::Args, Debug)]
pub struct VmmArgs {
    /// The VMM's arguments (see `evoke vmm --help`).
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub args: Vec<OsString>,
}

/// Reached only through clap (global flags before `vmm`); logging is set up.
pub fn main(_global: &Global, args: VmmArgs) -> anyhow::Result<u8> {
    Ok(evoke_vmm::cli::main("evoke vmm", args.args))
}

/// `evoke vmm ...` as the first argument: runs the VMM and returns its exit
/// code; anything else returns `None` for the normal command line.
pub fn fast_path() -> Option<ExitCode> {
    let mut args = std::env::args_os().skip(1);
    if args.next()? != "vmm" {
        return None;
    }
    init_logging();
    Some(ExitCode::from(evoke_vmm::cli::main("evoke vmm", args)))
}

/// Warnings and errors to stderr (the console log), or the level EVOKE_LOG
/// names; a filter that is not a plain level gets the full EnvFilter.
fn init_logging() {
    let spec = std::env::var("EVOKE_LOG").unwrap_or_default();
    let builder = tracing_subscriber::fmt().with_writer(std::io::stderr);
    if spec.is_empty() {
        builder
            .with_max_level(tracing_subscriber::filter::LevelFilter::WARN)
            .init();
    } else if let Ok(level) = spec.parse::<tracing_subscriber::filter::LevelFilter>() {
        builder.with_max_level(level).init();
    } else {
        builder
            .with_env_filter(tracing_subscriber::EnvFilter::new(spec))
            .init();
    }
}
