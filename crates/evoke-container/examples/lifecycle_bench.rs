//! Benchmark driver for bench/container/run: N sequential
//! create → start → wait → delete cycles of one bundle with any
//! runc-compatible runtime, and the same with each runtime given.
//!
//! Usage: lifecycle_bench BUNDLE N NAME=CMD [NAME=CMD...]
//! where CMD is the runtime's command prefix, e.g. `runc` or
//! `/path/evoke oci`. The driver is a child subreaper, so every
//! container's init is reparented to it when the runtime's `create`
//! exits; it then waits for the init with waitpid, the same way for all.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::wait::waitpid;
use nix::unistd::Pid;

fn run(prefix: &[String], args: &[&str]) -> Result<(), String> {
    let st = Command::new(&prefix[0])
        .args(&prefix[1..])
        .args(args)
        .stdin(Stdio::null())
        .status()
        .map_err(|e| format!("spawn {}: {e}", prefix[0]))?;
    if !st.success() {
        return Err(format!(
            "{} {} failed: {st}",
            prefix.join(" "),
            args.join(" ")
        ));
    }
    Ok(())
}

/// CPU time (user + system) of all waited-for children so far, in ms.
fn children_cpu_ms() -> f64 {
    use nix::sys::resource::{getrusage, UsageWho};
    let u = getrusage(UsageWho::RUSAGE_CHILDREN).expect("getrusage");
    let ms = |t: nix::sys::time::TimeVal| t.tv_sec() as f64 * 1000.0 + t.tv_usec() as f64 / 1000.0;
    ms(u.user_time()) + ms(u.system_time())
}

fn cycle(prefix: &[String], root: &Path, bundle: &str, id: &str) -> Result<Duration, String> {
    let root_s = root.to_string_lossy().into_owned();
    let pid_file = root.join(format!("{id}.pid"));
    let pid_s = pid_file.to_string_lossy().into_owned();
    let mut p = prefix.to_vec();
    p.extend(["--root".to_string(), root_s]);
    let t = Instant::now();
    run(
        &p,
        &["create", "--bundle", bundle, "--pid-file", &pid_s, id],
    )?;
    let pid: i32 = std::fs::read_to_string(&pid_file)
        .map_err(|e| format!("read {pid_s}: {e}"))?
        .trim()
        .parse()
        .map_err(|e| format!("pid file {pid_s}: {e}"))?;
    run(&p, &["start", id])?;
    waitpid(Pid::from_raw(pid), None).map_err(|e| format!("waitpid {pid}: {e}"))?;
    run(&p, &["delete", id])?;
    Ok(t.elapsed())
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 4 {
        eprintln!("usage: lifecycle_bench BUNDLE N NAME=CMD [NAME=CMD...]");
        std::process::exit(2);
    }
    let bundle = &args[1];
    let n: usize = args[2].parse().expect("N must be a number");
    nix::sys::prctl::set_child_subreaper(true).expect("prctl(PR_SET_CHILD_SUBREAPER)");
    let root = tempfile::tempdir().expect("temp state root");
    let mut rts = Vec::new();
    for spec in &args[3..] {
        let (name, cmd) = spec.split_once('=').expect("NAME=CMD");
        let prefix: Vec<String> = cmd.split_whitespace().map(str::to_string).collect();
        let rroot = root.path().join(name);
        std::fs::create_dir_all(&rroot).expect("runtime state dir");
        // Warm up the page cache and the runtime's own caches.
        for i in 0..3 {
            if let Err(e) = cycle(&prefix, &rroot, bundle, &format!("warm{i}")) {
                eprintln!("{name}: {e}");
                std::process::exit(1);
            }
        }
        rts.push((
            name.to_string(),
            prefix,
            rroot,
            Vec::with_capacity(n),
            0.0f64,
        ));
    }
    // Round-robin, so that background load hits every runtime alike.
    for i in 0..n {
        for (name, prefix, rroot, times, cpu) in rts.iter_mut() {
            let c0 = children_cpu_ms();
            match cycle(prefix, rroot, bundle, &format!("c{i}")) {
                Ok(d) => times.push(d.as_secs_f64() * 1000.0),
                Err(e) => {
                    eprintln!("{name}: {e}");
                    std::process::exit(1);
                }
            }
            *cpu += children_cpu_ms() - c0;
        }
    }
    let mut results: Vec<(String, f64, f64)> = Vec::new();
    for (name, _, _, mut times, cpu) in rts {
        times.sort_by(|a, b| a.total_cmp(b));
        let mean = times.iter().sum::<f64>() / n as f64;
        let p50 = times[n / 2];
        let p95 = times[(n * 95 / 100).min(n - 1)];
        let cpu = cpu / n as f64;
        println!(
            "{name:<8} wall mean {mean:7.2} ms  p50 {p50:7.2} ms  p95 {p95:7.2} ms  cpu {cpu:6.2} ms  ({n} cycles)"
        );
        results.push((name, mean, cpu));
    }
    if let Some((base, bmean, bcpu)) = results.first() {
        for (name, mean, cpu) in &results[1..] {
            println!(
                "{base}/{name}: wall {:.2}  cpu {:.2}",
                bmean / mean,
                bcpu / cpu
            );
        }
    }
}
