//! Liveness, readiness and startup probes: how to run one check (exec,
//! httpGet, tcpSocket) and the threshold state machine over the results.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::path::PathBuf;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Container, Probe};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

/// Kubernetes' defaults for a probe's timing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timing {
    pub initial_delay: Duration,
    pub period: Duration,
    pub timeout: Duration,
    pub success_threshold: u32,
    pub failure_threshold: u32,
}

impl Timing {
    pub fn of(p: &Probe) -> Timing {
        let secs = |v: Option<i32>, d: i32| Duration::from_secs(v.unwrap_or(d).max(0) as u64);
        Timing {
            initial_delay: secs(p.initial_delay_seconds, 0),
            period: secs(p.period_seconds, 10).max(Duration::from_secs(1)),
            timeout: secs(p.timeout_seconds, 1).max(Duration::from_secs(1)),
            success_threshold: p.success_threshold.unwrap_or(1).max(1) as u32,
            failure_threshold: p.failure_threshold.unwrap_or(3).max(1) as u32,
        }
    }
}

/// Consecutive results against the thresholds. The result flips only after
/// `success_threshold` successes or `failure_threshold` failures in a row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeState {
    pub timing: Timing,
    ok_run: u32,
    fail_run: u32,
    /// The current verdict; None until the first threshold is reached.
    pub result: Option<bool>,
}

impl ProbeState {
    pub fn new(timing: Timing) -> ProbeState {
        ProbeState {
            timing,
            ok_run: 0,
            fail_run: 0,
            result: None,
        }
    }

    /// Feeds one check; returns the new verdict when it changes.
    pub fn observe(&mut self, ok: bool) -> Option<bool> {
        if ok {
            self.ok_run += 1;
            self.fail_run = 0;
        } else {
            self.fail_run += 1;
            self.ok_run = 0;
        }
        let verdict = if self.ok_run >= self.timing.success_threshold {
            Some(true)
        } else if self.fail_run >= self.timing.failure_threshold {
            Some(false)
        } else {
            None
        };
        match verdict {
            Some(v) if self.result != Some(v) => {
                self.result = Some(v);
                Some(v)
            }
            _ => None,
        }
    }
}

/// How to reach the pod's network for httpGet and tcpSocket checks.
#[derive(Debug, Clone)]
pub struct Target {
    /// The pod's network namespace, entered by a short-lived thread; None
    /// means the host's network.
    pub netns: Option<PathBuf>,
    /// Address to dial when the probe names no host.
    pub default_host: String,
}

/// Resolves a port that may be a container port's name.
pub fn resolve_port(port: &IntOrString, c: &Container) -> Option<u16> {
    match port {
        IntOrString::Int(p) => u16::try_from(*p).ok(),
        IntOrString::String(s) => s.parse().ok().or_else(|| {
            c.ports
                .iter()
                .flatten()
                .find(|p| p.name.as_deref() == Some(s))
                .and_then(|p| u16::try_from(p.container_port).ok())
        }),
    }
}

fn in_netns<T: Send + 'static>(
    netns: Option<PathBuf>,
    f: impl FnOnce() -> T + Send + 'static,
) -> Option<T> {
    // setns() changes only the calling thread, so a fresh thread does the
    // check and ends; no pooled thread is ever left in a pod's namespace.
    std::thread::spawn(move || {
        if let Some(path) = netns {
            let file = std::fs::File::open(&path).ok()?;
            nix::sched::setns(file, nix::sched::CloneFlags::CLONE_NEWNET).ok()?;
        }
        Some(f())
    })
    .join()
    .ok()
    .flatten()
}

/// One tcpSocket check: the port accepts a connection.
pub fn tcp_check(target: &Target, host: Option<&str>, port: u16, timeout: Duration) -> bool {
    let host = host
        .filter(|h| !h.is_empty())
        .unwrap_or(&target.default_host)
        .to_string();
    in_netns(target.netns.clone(), move || {
        let Some(addr) = (host.as_str(), port)
            .to_socket_addrs()
            .ok()
            .and_then(|mut a| a.next())
        else {
            return false;
        };
        TcpStream::connect_timeout(&addr, timeout).is_ok()
    })
    .unwrap_or(false)
}

/// One httpGet check: a status from 200 to 399.
pub fn http_check(
    target: &Target,
    host: Option<&str>,
    port: u16,
    path: &str,
    headers: &[(String, String)],
    timeout: Duration,
) -> bool {
    let host = host
        .filter(|h| !h.is_empty())
        .unwrap_or(&target.default_host)
        .to_string();
    let path = if path.is_empty() {
        "/".to_string()
    } else {
        path.to_string()
    };
    let headers = headers.to_vec();
    in_netns(target.netns.clone(), move || {
        let Some(addr): Option<SocketAddr> = (host.as_str(), port).to_socket_addrs().ok().and_then(|mut a| a.next()) else {
            return false;
        };
        let Ok(mut s) = TcpStream::connect_timeout(&addr, timeout) else { return false };
        let _ = s.set_read_timeout(Some(timeout));
        let _ = s.set_write_timeout(Some(timeout));
        let mut req = format!("GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUser-Agent: kube-probe/1.33\r\nAccept: */*\r\nConnection: close\r\n");
        for (k, v) in &headers {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        req.push_str("\r\n");
        if s.write_all(req.as_bytes()).is_err() {
            return false;
        }
        let mut buf = [0u8; 64];
        let mut got = Vec::new();
        while got.len() < 12 {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
        status_ok(&got)
    })
    .unwrap_or(false)
}

/// Whether an HTTP response starts with a 2xx or 3xx status line.
pub fn status_ok(head: &[u8]) -> bool {
    let line = String::from_utf8_lossy(head);
    let mut parts = line.split_whitespace();
    let proto_ok = parts.next().is_some_and(|p| p.starts_with("HTTP/"));
    let code: u16 = parts.next().and_then(|c| c.parse().ok()).unwrap_or(0);
    proto_ok && (200..400).contains(&code)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn timing(success: u32, failure: u32) -> Timing {
        Timing {
            initial_delay: Duration::ZERO,
            period: Duration::from_secs(1),
            timeout: Duration::from_secs(1),
            success_threshold: success,
            failure_threshold: failure,
        }
    }

    #[test]
    fn defaults_match_kubernetes() {
        let t = Timing::of(&Probe::default());
        assert_eq!(t.period, Duration::from_secs(10));
        assert_eq!(t.timeout, Duration::from_secs(1));
        assert_eq!((t.success_threshold, t.failure_threshold), (1, 3));
    }

    #[test]
    fn verdict_flips_only_after_threshold_runs() {
        let mut s = ProbeState::new(timing(2, 3));
        assert_eq!(s.observe(true), None);
        assert_eq!(s.observe(true), Some(true));
        assert_eq!(s.observe(false), None);
        assert_eq!(s.observe(false), None);
        assert_eq!(s.observe(true), None);
        assert_eq!(s.observe(false), None);
        assert_eq!(s.observe(false), None);
        assert_eq!(s.observe(false), Some(false));
        assert_eq!(s.observe(false), None);
    }

    #[test]
    fn http_status_2xx_and_3xx_pass() {
        assert!(status_ok(b"HTTP/1.1 200 OK\r\n"));
        assert!(status_ok(b"HTTP/1.0 302 Found\r\n"));
        assert!(!status_ok(b"HTTP/1.1 500 Internal\r\n"));
        assert!(!status_ok(b"garbage"));
    }

    #[test]
    fn tcp_and_http_checks_reach_a_local_server() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        std::thread::spawn(move || {
            for s in l.incoming().take(2) {
                let mut s = s.unwrap();
                let mut buf = [0u8; 512];
                let _ = s.read(&mut buf);
                let _ = s.write_all(b"HTTP/1.1 204 No Content\r\n\r\n");
            }
        });
        let t = Target {
            netns: None,
            default_host: "127.0.0.1".into(),
        };
        assert!(tcp_check(&t, None, port, Duration::from_secs(1)));
        assert!(http_check(
            &t,
            None,
            port,
            "/healthz",
            &[],
            Duration::from_secs(1)
        ));
        // Nothing listens on a freshly freed port.
        let free = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        assert!(!tcp_check(&t, None, free, Duration::from_millis(300)));
    }

    #[test]
    fn named_ports_resolve_through_the_container() {
        let c: Container = serde_json::from_value(
            serde_json::json!({"name": "c", "ports": [{"name": "http", "containerPort": 8080}]}),
        )
        .unwrap();
        assert_eq!(
            resolve_port(&IntOrString::String("http".into()), &c),
            Some(8080)
        );
        assert_eq!(resolve_port(&IntOrString::Int(80), &c), Some(80));
        assert_eq!(resolve_port(&IntOrString::String("nope".into()), &c), None);
    }
}
