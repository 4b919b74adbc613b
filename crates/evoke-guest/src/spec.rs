//! What the guest runs: written by the host into the initramfs as JSON at
//! [`SPEC_PATH`], read by the agent at boot. The host resolves the image's
//! Entrypoint/Cmd/Env/WorkingDir/User and the user's overrides into this; the
//! guest only executes it.

use serde::{Deserialize, Serialize};

/// Where the spec lives inside the initramfs.
pub const SPEC_PATH: &str = "/evoke/spec.json";
/// Where the image's root filesystem lives inside the initramfs; the workload
/// is chrooted into it.
pub const ROOTFS_DIR: &str = "/rootfs";
/// The kernel modules the agent loads, one path (relative to
/// [`MODULES_DIR`]) a line, dependencies first.
pub const MODULES_LIST: &str = "/evoke/modules.list";
pub const MODULES_DIR: &str = "/evoke/modules";
/// The line the agent writes on /dev/console as its very first action, so a
/// host can timestamp the guest's first user-space instruction. It is
/// followed by ` t=SECONDS`, the guest kernel's CLOCK_BOOTTIME at that point.
pub const BOOT_MARK: &str = "evoke-guest: init";
/// In [`Channel::Console`] mode, the last line on the console is this prefix
/// followed by the exit code.
pub const CONSOLE_EXIT_PREFIX: &str = "evoke-guest: exit ";

/// The workload and how the agent talks to the host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct GuestSpec {
    /// Program and arguments; the program is looked up in the workload's PATH
    /// inside the rootfs when it has no `/`.
    pub argv: Vec<String>,
    /// `KEY=VALUE` entries, the whole environment of the workload.
    pub env: Vec<String>,
    /// Working directory inside the rootfs (created when missing).
    pub workdir: String,
    pub uid: u32,
    pub gid: u32,
    pub hostname: Option<String>,
    pub channel: Channel,
    pub shutdown: Shutdown,
    /// Give the workload a stdin pipe fed by the host's [`crate::proto::Frame::Stdin`]
    /// frames; otherwise its stdin is /dev/null.
    pub stdin: bool,
    /// eth0's address, route and resolv.conf when the VM has a virtio-net.
    pub network: Option<crate::net::NetConfig>,
}

impl Default for GuestSpec {
    fn default() -> Self {
        GuestSpec {
            argv: Vec::new(),
            env: vec!["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into()],
            workdir: "/".into(),
            uid: 0,
            gid: 0,
            hostname: None,
            channel: Channel::default(),
            shutdown: Shutdown::default(),
            stdin: false,
            network: None,
        }
    }
}

/// The agent channel: where [`crate::proto`] frames go.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Channel {
    /// A virtio-console port if one appears (`/dev/vport*p*`, else
    /// `/dev/hvc0`), else [`Channel::Console`].
    #[default]
    Auto,
    /// virtio-console (virtio-mmio): a multiport port `/dev/vportNpM`, or the
    /// console port `/dev/hvc0` in raw mode.
    VirtioConsole,
    /// The second 8250 UART, `/dev/ttyS1` (I/O port 0x2f8), in raw mode.
    Serial,
    /// No framed channel: the workload's stdout and stderr are written
    /// unframed to /dev/console and the exit code as a last line
    /// ([`CONSOLE_EXIT_PREFIX`]).
    Console,
}

/// How the agent ends the VM once the workload has exited.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Shutdown {
    /// `reboot(RB_AUTOBOOT)`: with `reboot=k` the kernel writes 0xfe to the
    /// i8042 port 0x64 and then triple-faults (KVM_EXIT_SHUTDOWN); QEMU with
    /// `-no-reboot` exits. Works without ACPI.
    #[default]
    Reboot,
    /// `reboot(RB_POWER_OFF)`: needs ACPI (or another power-off driver) in
    /// the guest, otherwise the kernel only halts.
    PowerOff,
}

/// A command to run next to the workload (`evoke exec`, `kubectl exec`),
/// in the workload's rootfs, with its environment, working directory and
/// user unless the request overrides them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct ExecRequest {
    /// Program and arguments, looked up like the workload's; not empty.
    pub argv: Vec<String>,
    /// `KEY=VALUE` entries added to (and overriding) the workload's.
    pub env: Vec<String>,
    /// Working directory; the workload's when unset.
    pub workdir: Option<String>,
    /// UID and GID; the workload's when unset.
    pub user: Option<(u32, u32)>,
    /// Run on a new pseudo-terminal (stdout carries both streams).
    pub tty: bool,
    /// The command reads stdin from the host; otherwise /dev/null.
    pub stdin: bool,
    /// The terminal's first size, when known.
    pub cols: u16,
    pub rows: u16,
}

impl ExecRequest {
    pub fn from_json(bytes: &[u8]) -> Result<Self, serde_json::Error> {
        let req: ExecRequest = serde_json::from_slice(bytes)?;
        if req.argv.is_empty() {
            return Err(serde::de::Error::custom("exec request has an empty argv"));
        }
        Ok(req)
    }

    pub fn to_json(&self) -> Vec<u8> {
        // Plain strings and integers always serialise.
        serde_json::to_vec(self).unwrap_or_default()
    }
}

impl GuestSpec {
    /// Parses a spec; an empty `argv` is an error.
    pub fn from_json(bytes: &[u8]) -> Result<Self, serde_json::Error> {
        let spec: GuestSpec = serde_json::from_slice(bytes)?;
        if spec.argv.is_empty() {
            return Err(serde::de::Error::custom("guest spec has an empty argv"));
        }
        Ok(spec)
    }

    pub fn to_json(&self) -> Vec<u8> {
        // Serialising plain strings and integers cannot fail.
        serde_json::to_vec_pretty(self).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_round_trips_through_json() {
        let spec = GuestSpec {
            argv: vec!["sh".into(), "-c".into(), "echo hi".into()],
            channel: Channel::Serial,
            shutdown: Shutdown::PowerOff,
            hostname: Some("vm1".into()),
            ..GuestSpec::default()
        };
        assert_eq!(GuestSpec::from_json(&spec.to_json()).unwrap(), spec);
    }

    #[test]
    fn spec_with_only_argv_gets_defaults() {
        let spec = GuestSpec::from_json(br#"{"argv":["true"]}"#).unwrap();
        assert_eq!(spec.workdir, "/");
        assert_eq!(spec.channel, Channel::Auto);
        assert!(spec.env[0].starts_with("PATH="));
    }

    #[test]
    fn spec_without_argv_is_rejected() {
        let err = GuestSpec::from_json(br#"{"env":[]}"#).unwrap_err();
        assert!(err.to_string().contains("empty argv"), "{err}");
    }
}
