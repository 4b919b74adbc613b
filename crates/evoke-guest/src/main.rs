//! The evoke-guest binary. As PID 1 it is the microVM guest's /init and
//! agent (see `agent.rs`). Run anywhere else it is a small host tool:
//!
//! * `evoke-guest mkinitramfs -o OUT --rootfs DIR [--modules-dir DIR]
//!   [--module NAME]... [--cache DIR] [--agent PATH] [--channel auto|virtio-console|serial|console]
//!   [--shutdown reboot|power-off] [-e K=V]... [-w DIR] -- ARGV...`
//!   writes a guest initramfs (used by bench/microvm and the tests with QEMU).
//! * `evoke-guest decode [FILE]` reads agent frames (from a file or stdin),
//!   writes the workload's stdout and stderr, and exits with its code.

mod agent;
mod exec;
mod pty;
mod sys;
mod tools;

fn main() {
    if std::process::id() == 1 {
        agent::run();
    }
    std::process::exit(tools::main(std::env::args().skip(1).collect()));
}
