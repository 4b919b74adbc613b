//! What a container costs a big, multi-threaded caller (the node agent in
//! `evoke server`), with the intermediate process forked or started as a
//! fresh exec (crates/evoke-container/src/spawn.rs), side by side.
//!
//! The process holds HEAP_MB of touched private memory and a second thread
//! that, after each container, writes one byte per page of it, as a
//! server's threads keep touching their heap. Per cycle
//! (create → start → wait → delete of the bundle's process, through the
//! library calls the container tier makes) it reports the wall time, the
//! CPU of the calling thread plus the container's processes, and the CPU
//! of that writer pass: after a fork every page is write-protected, so the
//! pass takes a page fault per page.
//!
//! Usage (root): spawn_bench BUNDLE N [HEAP_MB]   (bench/container/run
//! makes the bundle; `BENCH_SPAWN=1 bench/container/run` runs this too).

use std::path::Path;
use std::sync::mpsc;
use std::time::Instant;

use evoke_container::spawn::SPAWN_ENV;
use nix::sys::resource::{getrusage, UsageWho};

fn cpu_ms(who: UsageWho) -> f64 {
    let u = getrusage(who).expect("getrusage");
    let ms = |t: nix::sys::time::TimeVal| t.tv_sec() as f64 * 1000.0 + t.tv_usec() as f64 / 1000.0;
    ms(u.user_time()) + ms(u.system_time())
}

/// One create → start → wait → delete; the exit code must be 0.
fn cycle(root: &Path, bundle: &Path, id: &str) -> Result<(), String> {
    let opts = evoke_container::CreateOptions::default();
    evoke_container::create(root, id, bundle, opts).map_err(|e| format!("create: {e}"))?;
    evoke_container::start(root, id).map_err(|e| format!("start: {e}"))?;
    let exit = evoke_container::wait(root, id).map_err(|e| format!("wait: {e}"))?;
    evoke_container::delete(root, id, true).map_err(|e| format!("delete: {e}"))?;
    if exit.code != 0 {
        return Err(format!("container {id} exited with {}", exit.code));
    }
    Ok(())
}

#[derive(Default)]
struct Stats {
    wall: Vec<f64>,
    cpu: f64,
    writer: f64,
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 3 {
        eprintln!("usage: spawn_bench BUNDLE N [HEAP_MB]");
        std::process::exit(2);
    }
    let bundle = Path::new(&args[1]);
    let n: usize = args[2].parse().expect("N must be a number");
    let heap_mb: usize = args
        .get(3)
        .map_or(256, |s| s.parse().expect("HEAP_MB must be a number"));
    let page = 4096;
    let mut heap = vec![1u8; heap_mb << 20];

    // The writer owns the heap: one byte per page on request, reporting
    // its CPU time for the pass.
    let (go_tx, go_rx) = mpsc::channel::<()>();
    let (done_tx, done_rx) = mpsc::channel::<f64>();
    let writer = std::thread::spawn(move || {
        while go_rx.recv().is_ok() {
            let t0 = cpu_ms(UsageWho::RUSAGE_THREAD);
            for b in heap.iter_mut().step_by(page) {
                *b = std::hint::black_box(b.wrapping_add(1));
            }
            let _ = done_tx.send(cpu_ms(UsageWho::RUSAGE_THREAD) - t0);
        }
        heap.len()
    });

    let root = tempfile::tempdir().expect("state root");
    let modes = ["fork", "exec"];
    let mut stats: Vec<Stats> = modes.iter().map(|_| Stats::default()).collect();
    for i in 0..n + 2 {
        for (m, mode) in modes.iter().enumerate() {
            std::env::set_var(SPAWN_ENV, mode);
            let id = format!("s{i}-{mode}");
            let c0 = cpu_ms(UsageWho::RUSAGE_THREAD) + cpu_ms(UsageWho::RUSAGE_CHILDREN);
            let t0 = Instant::now();
            if let Err(e) = cycle(root.path(), bundle, &id) {
                eprintln!("{mode}: {e}");
                std::process::exit(1);
            }
            let wall = t0.elapsed().as_secs_f64() * 1000.0;
            let cpu = cpu_ms(UsageWho::RUSAGE_THREAD) + cpu_ms(UsageWho::RUSAGE_CHILDREN) - c0;
            go_tx.send(()).expect("writer alive");
            let w = done_rx.recv().expect("writer alive");
            // The first two rounds warm up caches; not counted.
            if i >= 2 {
                let s = &mut stats[m];
                s.wall.push(wall);
                s.cpu += cpu;
                s.writer += w;
            }
        }
    }
    drop(go_tx);
    let heap_len = writer.join().expect("writer thread");
    assert_eq!(heap_len, heap_mb << 20);
    println!(
        "== {n} cycles per mode, caller with {heap_mb} MiB touched and 2 threads (ms per cycle)"
    );
    let mut rows = Vec::new();
    for (mode, s) in modes.iter().zip(&mut stats) {
        s.wall.sort_by(|a, b| a.total_cmp(b));
        let mean = s.wall.iter().sum::<f64>() / n as f64;
        let p50 = s.wall[n / 2];
        let cpu = s.cpu / n as f64;
        let writer = s.writer / n as f64;
        println!(
            "{mode:<5} wall mean {mean:7.2}  p50 {p50:7.2}  cpu caller+container {cpu:6.2}  writer pass {writer:6.2}  total cpu {:6.2}",
            cpu + writer
        );
        rows.push((mean, cpu + writer));
    }
    println!(
        "exec/fork: wall {:.2}  total cpu {:.2}",
        rows[1].0 / rows[0].0,
        rows[1].1 / rows[0].1
    );
}
