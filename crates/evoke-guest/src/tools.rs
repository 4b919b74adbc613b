//! Host-side subcommands of the evoke-guest binary (when it is not PID 1).

use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use evoke_guest::initramfs::{GuestBase, InitramfsBuilder, Rootfs, DEFAULT_MODULES};
use evoke_guest::proto::Frame;
use evoke_guest::spec::{Channel, GuestSpec, Shutdown};

const USAGE: &str = "usage: evoke-guest mkinitramfs -o OUT --rootfs DIR [--modules-dir DIR] [--module NAME]... \
[--cache DIR] [--agent PATH] [--channel auto|virtio-console|serial|console] [--shutdown reboot|power-off] \
[-e K=V]... [-w DIR] -- ARGV...\n       evoke-guest decode [FILE]\n       \
evoke-guest boottime [--guest-mem-mib N] [--timeout-s N] [--verbose] [--console-on-stderr] [--save-other FILE] -- VMM ARGS...";

pub fn main(args: Vec<String>) -> i32 {
    let res = match args.first().map(String::as_str) {
        Some("mkinitramfs") => mkinitramfs(&args[1..]),
        Some("decode") => decode(args.get(1).map(PathBuf::from)),
        Some("boottime") => boottime(&args[1..]),
        _ => Err(USAGE.to_owned()),
    };
    match res {
        Ok(code) => code,
        Err(msg) => {
            eprintln!("evoke-guest: {msg}");
            2
        }
    }
}

fn default_modules_dir() -> Result<PathBuf, String> {
    // The guest kernel is Debian's cloud kernel; its modules sit next to it.
    let mut dirs: Vec<PathBuf> = std::fs::read_dir("/lib/modules")
        .map_err(|e| format!("read /lib/modules: {e}"))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.to_string_lossy().ends_with("-cloud-amd64"))
        .collect();
    dirs.sort();
    dirs.pop().ok_or_else(|| {
        "no /lib/modules/*-cloud-amd64: run scripts/setup (linux-image-cloud-amd64)".to_owned()
    })
}

fn mkinitramfs(args: &[String]) -> Result<i32, String> {
    let mut out = None;
    let mut rootfs = None;
    let mut modules_dir = None;
    let mut modules: Vec<String> = Vec::new();
    let mut cache = None;
    let mut agent = None;
    let mut spec = GuestSpec::default();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut val = || {
            it.next()
                .cloned()
                .ok_or_else(|| format!("{a} needs a value\n{USAGE}"))
        };
        match a.as_str() {
            "-o" => out = Some(PathBuf::from(val()?)),
            "--rootfs" => rootfs = Some(PathBuf::from(val()?)),
            "--modules-dir" => modules_dir = Some(PathBuf::from(val()?)),
            "--module" => modules.push(val()?),
            "--cache" => cache = Some(PathBuf::from(val()?)),
            "--agent" => agent = Some(PathBuf::from(val()?)),
            "-e" => spec.env.push(val()?),
            "-w" => spec.workdir = val()?,
            "--channel" => {
                spec.channel = match val()?.as_str() {
                    "auto" => Channel::Auto,
                    "virtio-console" => Channel::VirtioConsole,
                    "serial" => Channel::Serial,
                    "console" => Channel::Console,
                    other => return Err(format!("unknown channel {other}")),
                }
            }
            "--shutdown" => {
                spec.shutdown = match val()?.as_str() {
                    "reboot" => Shutdown::Reboot,
                    "power-off" => Shutdown::PowerOff,
                    other => return Err(format!("unknown shutdown {other}")),
                }
            }
            "--" => {
                spec.argv = it.by_ref().cloned().collect();
            }
            other => return Err(format!("unknown argument {other}\n{USAGE}")),
        }
    }
    let out = out.ok_or_else(|| format!("-o OUT is required\n{USAGE}"))?;
    let rootfs = rootfs.ok_or_else(|| format!("--rootfs DIR is required\n{USAGE}"))?;
    if spec.argv.is_empty() {
        return Err(format!("the command after -- is required\n{USAGE}"));
    }
    let modules_dir = match modules_dir {
        Some(d) => d,
        None => default_modules_dir()?,
    };
    let agent = match agent {
        Some(a) => a,
        None => std::env::current_exe().map_err(|e| format!("find own executable: {e}"))?,
    };
    let names: Vec<&str> = if modules.is_empty() {
        DEFAULT_MODULES.to_vec()
    } else {
        modules.iter().map(String::as_str).collect()
    };
    let cache = cache.unwrap_or_else(|| std::env::temp_dir().join("evoke-guest-cache"));
    let builder = InitramfsBuilder::new(cache);
    let base = GuestBase {
        agent: &agent,
        modules_dir: &modules_dir,
        modules: &names,
    };
    let initrd = builder
        .build(&base, &Rootfs::Dir(rootfs), None, &spec)
        .map_err(|e| e.to_string())?;
    initrd.write_file(&out).map_err(|e| e.to_string())?;
    Ok(0)
}

/// Replays agent frames: output to our stdout/stderr, exit code as ours.
fn decode(path: Option<PathBuf>) -> Result<i32, String> {
    let mut input: Box<dyn Read> = match &path {
        Some(p) => Box::new(io::BufReader::new(
            std::fs::File::open(p).map_err(|e| format!("open {}: {e}", p.display()))?,
        )),
        None => Box::new(io::stdin().lock()),
    };
    let name = path
        .as_deref()
        .unwrap_or(Path::new("<stdin>"))
        .display()
        .to_string();
    loop {
        match Frame::read_from(&mut input) {
            Ok(Some(Frame::Stdout(b))) => {
                let mut o = io::stdout().lock();
                let _ = o.write_all(&b);
                let _ = o.flush();
            }
            Ok(Some(Frame::Stderr(b))) => {
                let _ = io::stderr().write_all(&b);
            }
            Ok(Some(Frame::Error(m))) => eprintln!("evoke-guest (guest): {m}"),
            Ok(Some(Frame::Exit(s))) => return Ok(s.code),
            Ok(Some(_)) => {}
            Ok(None) => {
                return Err(format!(
                    "{name}: the guest ended without reporting an exit status"
                ))
            }
            Err(e) => return Err(format!("{name}: {e}")),
        }
    }
}

/// Runs a VMM command and measures, from just before it is spawned: when the
/// guest's boot mark ([`evoke_guest::spec::BOOT_MARK`]) shows up on the VMM's
/// serial console (its stdout, or stderr with `--console-on-stderr`), and
/// when the VMM exits. The other stream is kept in `--save-other FILE`
/// (e.g. the agent channel, for `evoke-guest decode`). At the mark it also
/// reads /proc/PID/smaps of the VMM: its RSS without the guest-memory
/// mappings (those at least as large as the guest's RAM), which is how
/// Firecracker measures VMM overhead. Prints one JSON object.
fn boottime(args: &[String]) -> Result<i32, String> {
    use std::io::BufRead;
    use std::process::{Command, Stdio};
    use std::time::{Duration, Instant};

    let mut guest_mem_mib: u64 = 0;
    let mut timeout = Duration::from_secs(120);
    let mut verbose = false;
    let mut console_on_stderr = false;
    let mut save_other: Option<PathBuf> = None;
    let mut it = args.iter();
    let mut argv = Vec::new();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--guest-mem-mib" => {
                guest_mem_mib = it
                    .next()
                    .and_then(|v| v.parse().ok())
                    .ok_or("--guest-mem-mib needs a number")?
            }
            "--timeout-s" => {
                timeout = Duration::from_secs(
                    it.next()
                        .and_then(|v| v.parse().ok())
                        .ok_or("--timeout-s needs a number")?,
                )
            }
            "--verbose" => verbose = true,
            "--console-on-stderr" => console_on_stderr = true,
            "--save-other" => {
                save_other = Some(PathBuf::from(it.next().ok_or("--save-other needs a file")?))
            }
            "--" => argv = it.by_ref().cloned().collect(),
            other => return Err(format!("unknown argument {other}\n{USAGE}")),
        }
    }
    if argv.is_empty() {
        return Err(format!("the VMM command after -- is required\n{USAGE}"));
    }
    let start = Instant::now();
    let mut child = Command::new(&argv[0])
        .args(&argv[1..])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("spawn {}: {e}", argv[0]))?;
    let pid = child.id();
    let out = child.stdout.take().ok_or("vmm stdout missing")?;
    let err = child.stderr.take().ok_or("vmm stderr missing")?;
    let (console, other): (Box<dyn Read + Send>, Box<dyn Read + Send>) = if console_on_stderr {
        (Box::new(err), Box::new(out))
    } else {
        (Box::new(out), Box::new(err))
    };
    let mut sink: Box<dyn Write + Send> = match &save_other {
        Some(p) => {
            Box::new(std::fs::File::create(p).map_err(|e| format!("create {}: {e}", p.display()))?)
        }
        None => Box::new(io::sink()),
    };
    let other_reader = std::thread::spawn(move || {
        let mut other = other;
        let _ = io::copy(&mut other, &mut sink);
        let _ = sink.flush();
    });
    let (tx, rx) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        let mut seen = false;
        for line in io::BufReader::new(console).split(b'\n') {
            let Ok(line) = line else { break };
            if !seen
                && line
                    .windows(evoke_guest::spec::BOOT_MARK.len())
                    .any(|w| w == evoke_guest::spec::BOOT_MARK.as_bytes())
            {
                seen = true;
                let text = String::from_utf8_lossy(&line);
                let kernel_s: Option<f64> = text
                    .split("t=")
                    .nth(1)
                    .and_then(|v| v.split_whitespace().next()?.parse().ok());
                let _ = tx.send((start.elapsed(), kernel_s));
            }
            if verbose {
                eprintln!("vmm: {}", String::from_utf8_lossy(&line).trim_end());
            }
        }
    });
    let init = rx.recv_timeout(timeout).ok();
    let overhead_kib = init.and_then(|_| vmm_overhead_kib(pid, guest_mem_mib));
    let kernel_s = init.and_then(|(_, k)| k);
    let init = init.map(|(d, _)| d);
    let deadline = start + timeout;
    let status = loop {
        if let Some(st) = child.try_wait().map_err(|e| format!("wait for vmm: {e}"))? {
            break Some(st);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(1));
    };
    let exit = start.elapsed();
    let _ = reader.join();
    let _ = other_reader.join();
    let ms = |d: Duration| (d.as_secs_f64() * 1e6).round() / 1e3;
    println!(
        "{{\"init_ms\":{},\"guest_kernel_ms\":{},\"exit_ms\":{},\"vmm_status\":{},\"vmm_overhead_kib\":{}}}",
        init.map(|d| ms(d).to_string())
            .unwrap_or_else(|| "null".into()),
        kernel_s
            .map(|s| ((s * 1e6).round() / 1e3).to_string())
            .unwrap_or_else(|| "null".into()),
        ms(exit),
        status
            .and_then(|s| s.code())
            .map(|c| c.to_string())
            .unwrap_or_else(|| "null".into()),
        overhead_kib
            .map(|k| k.to_string())
            .unwrap_or_else(|| "null".into()),
    );
    Ok(if init.is_some() && status.is_some() {
        0
    } else {
        1
    })
}

/// RSS of `pid` in KiB minus the RSS of mappings at least as large as the
/// guest's memory.
fn vmm_overhead_kib(pid: u32, guest_mem_mib: u64) -> Option<u64> {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).ok()?;
    Some(overhead_from_smaps(&smaps, guest_mem_mib << 20))
}

fn overhead_from_smaps(smaps: &str, guest_bytes: u64) -> u64 {
    let (mut total, mut guest) = (0u64, 0u64);
    let mut current_is_guest = false;
    for line in smaps.lines() {
        let first = line.split_whitespace().next().unwrap_or("");
        if let Some((a, b)) = first.split_once('-') {
            if let (Ok(a), Ok(b)) = (u64::from_str_radix(a, 16), u64::from_str_radix(b, 16)) {
                current_is_guest = guest_bytes > 0 && b.saturating_sub(a) >= guest_bytes;
                continue;
            }
        }
        if let Some(v) = line.strip_prefix("Rss:") {
            let kib: u64 = v.trim().trim_end_matches("kB").trim().parse().unwrap_or(0);
            total += kib;
            if current_is_guest {
                guest += kib;
            }
        }
    }
    total - guest
}

#[cfg(test)]
mod tests {
    #[test]
    fn boottime_sees_the_mark_and_the_exit_of_a_fake_vmm() {
        let code = super::main(vec![
            "boottime".into(),
            "--timeout-s".into(),
            "20".into(),
            "--".into(),
            "sh".into(),
            "-c".into(),
            format!(
                "echo booting; echo '{}'; sleep 0.1",
                evoke_guest::spec::BOOT_MARK
            ),
        ]);
        assert_eq!(code, 0);
    }

    #[test]
    fn overhead_excludes_only_mappings_as_large_as_guest_memory() {
        let smaps = "\
55d0a0000000-55d0a0200000 r-xp 00000000 fd:01 123 /usr/bin/vmm
Size:               2048 kB
Rss:                1500 kB
7f0000000000-7f0010000000 rw-p 00000000 00:00 0
Size:             262144 kB
Rss:              100000 kB
7fff00000000-7fff00021000 rw-p 00000000 00:00 0 [stack]
Rss:                  12 kB
";
        assert_eq!(super::overhead_from_smaps(smaps, 256 << 20), 1512);
        assert_eq!(super::overhead_from_smaps(smaps, 0), 101_512);
        assert!(super::vmm_overhead_kib(std::process::id(), 0).unwrap() > 0);
    }
}
