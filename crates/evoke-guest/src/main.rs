//! Init and agent inside the microVM guest. Built as a static binary and
//! placed at /init in the guest's initramfs.

fn main() {
    eprintln!("evoke-guest: not wired yet");
    std::process::exit(1);
}
