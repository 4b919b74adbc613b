//! `evoke-vmm`: the VMM process as a small binary of its own, for builds
//! that want the VMM without the rest of evoke. `evoke vmm` runs the same
//! code ([`evoke_vmm::cli`]) with the same arguments; a leading `vmm` is
//! accepted so a script written for one runs the other.

use std::process::ExitCode;

fn main() -> ExitCode {
    let mut args = std::env::args_os().skip(1).peekable();
    if args.peek().is_some_and(|a| a == "vmm") {
        args.next();
    }
    ExitCode::from(evoke_vmm::cli::main("evoke-vmm", args))
}
