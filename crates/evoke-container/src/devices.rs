//! Device rules for cgroup v2. v1 has the `devices` controller with its
//! `devices.allow` file; v2 has none, and the kernel asks a
//! `BPF_PROG_TYPE_CGROUP_DEVICE` program attached to the cgroup instead.
//! [`program`] compiles the same allow rules (`c 1:3 rwm`, `b *:* m`, …)
//! into such a program, and [`attach`] loads it and attaches it to a cgroup
//! directory with bpf(2).
//!
//! The program sees `struct bpf_cgroup_dev_ctx { u32 access_type; u32
//! major; u32 minor; }`, where `access_type` is `access << 16 | type`
//! (type 1 block, 2 char; access bits 1 mknod, 2 read, 4 write), and returns
//! 1 to allow, 0 to deny. Every rule is one block of compare-and-skip
//! instructions ending in "return 1"; falling off the last rule denies.
#![allow(unsafe_code)]

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;

use crate::cgroups::CgroupError;

/// One eBPF instruction, as `struct bpf_insn`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Insn {
    code: u8,
    /// dst_reg in the low nibble, src_reg in the high one.
    regs: u8,
    off: i16,
    imm: i32,
}

// Opcodes (include/uapi/linux/bpf.h, bpf_common.h).
const LDX_MEM_W: u8 = 0x61; // BPF_LDX | BPF_MEM | BPF_W
const MOV64_X: u8 = 0xbf; // BPF_ALU64 | BPF_MOV | BPF_X
const MOV64_K: u8 = 0xb7; // BPF_ALU64 | BPF_MOV | BPF_K
const AND32_K: u8 = 0x54; // BPF_ALU | BPF_AND | BPF_K
const RSH32_K: u8 = 0x74; // BPF_ALU | BPF_RSH | BPF_K
const JNE_K: u8 = 0x55; // BPF_JMP | BPF_JNE | BPF_K
const EXIT: u8 = 0x95; // BPF_JMP | BPF_EXIT

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_PROG_ATTACH: libc::c_long = 8;
const BPF_PROG_TYPE_CGROUP_DEVICE: u32 = 15;
const BPF_CGROUP_DEVICE: u32 = 6;
/// Let other programs (a parent's, a later one) stack with ours.
const BPF_F_ALLOW_MULTI: u32 = 2;

// Registers: r1 = ctx on entry, then scratch; r2 = access bits; r3 = type;
// r4 = major; r5 = minor; r0 = verdict.
fn ins(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> Insn {
    Insn {
        code,
        regs: (src << 4) | (dst & 0x0f),
        off,
        imm,
    }
}

/// A parsed allow rule: type ('a', 'b' or 'c'), major and minor (`None` for
/// `*`), and the access bits it allows.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Rule {
    kind: char,
    major: Option<u32>,
    minor: Option<u32>,
    access: u32,
}

fn bad(rule: &str) -> CgroupError {
    CgroupError::InvalidDeviceRule(rule.to_string())
}

/// Parses a rule in `devices.allow` syntax: `TYPE MAJOR:MINOR ACCESS`, or a
/// bare `a` for every device.
fn parse(rule: &str) -> Result<Rule, CgroupError> {
    let mut parts = rule.split_whitespace();
    let kind = match parts.next() {
        Some("a") => 'a',
        Some("b") => 'b',
        Some("c") => 'c',
        _ => return Err(bad(rule)),
    };
    let Some(numbers) = parts.next() else {
        return if kind == 'a' {
            Ok(Rule {
                kind,
                major: None,
                minor: None,
                access: 7,
            })
        } else {
            Err(bad(rule))
        };
    };
    let (maj, min) = numbers.split_once(':').ok_or_else(|| bad(rule))?;
    let num = |s: &str| -> Result<Option<u32>, CgroupError> {
        if s == "*" {
            Ok(None)
        } else {
            s.parse().map(Some).map_err(|_| bad(rule))
        }
    };
    let mut access = 0;
    for c in parts.next().unwrap_or("rwm").chars() {
        access |= match c {
            'm' => 1,
            'r' => 2,
            'w' => 4,
            _ => return Err(bad(rule)),
        };
    }
    if parts.next().is_some() {
        return Err(bad(rule));
    }
    Ok(Rule {
        kind,
        major: num(maj)?,
        minor: num(min)?,
        access,
    })
}

/// Compiles allow rules into a program that allows exactly what they list
/// and denies everything else (the v1 `deny a` + `allow …` semantics).
pub fn program(allow: &[String]) -> Result<Vec<Insn>, CgroupError> {
    let mut p = vec![
        ins(LDX_MEM_W, 2, 1, 0, 0),    // r2 = ctx->access_type
        ins(MOV64_X, 3, 2, 0, 0),      // r3 = r2
        ins(AND32_K, 3, 0, 0, 0xffff), // r3 = type
        ins(RSH32_K, 2, 0, 0, 16),     // r2 = access
        ins(LDX_MEM_W, 4, 1, 4, 0),    // r4 = ctx->major
        ins(LDX_MEM_W, 5, 1, 8, 0),    // r5 = ctx->minor
    ];
    for text in allow {
        let r = parse(text)?;
        // Jumps are patched to the end of this block once its length is known.
        let mut block: Vec<Insn> = Vec::new();
        match r.kind {
            'b' => block.push(ins(JNE_K, 3, 0, 0, 1)),
            'c' => block.push(ins(JNE_K, 3, 0, 0, 2)),
            _ => {}
        }
        if r.access != 7 {
            // Allowed only if no requested bit lies outside the rule's.
            block.push(ins(MOV64_X, 1, 2, 0, 0));
            block.push(ins(AND32_K, 1, 0, 0, (!r.access & 7) as i32));
            block.push(ins(JNE_K, 1, 0, 0, 0));
        }
        if let Some(m) = r.major {
            block.push(ins(JNE_K, 4, 0, 0, m as i32));
        }
        if let Some(m) = r.minor {
            block.push(ins(JNE_K, 5, 0, 0, m as i32));
        }
        block.push(ins(MOV64_K, 0, 0, 0, 1));
        block.push(ins(EXIT, 0, 0, 0, 0));
        let len = block.len();
        for (i, insn) in block.iter_mut().enumerate() {
            if insn.code == JNE_K {
                insn.off = i16::try_from(len - i - 1).map_err(|_| bad(text))?;
            }
        }
        p.extend(block);
    }
    p.push(ins(MOV64_K, 0, 0, 0, 0));
    p.push(ins(EXIT, 0, 0, 0, 0));
    Ok(p)
}

/// `union bpf_attr` for BPF_PROG_LOAD, zero-padded to a size every kernel
/// since 5.x accepts (it checks that bytes it does not know are zero).
#[repr(C, align(8))]
struct ProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    _rest: [u8; 80],
}

/// `union bpf_attr` for BPF_PROG_ATTACH.
#[repr(C, align(8))]
struct ProgAttachAttr {
    target_fd: u32,
    attach_bpf_fd: u32,
    attach_type: u32,
    attach_flags: u32,
    _rest: [u8; 112],
}

fn bpf_err(op: &'static str, path: &Path) -> CgroupError {
    CgroupError::Io {
        op,
        path: path.to_path_buf(),
        source: std::io::Error::last_os_error(),
    }
}

/// Loads `prog` and attaches it to the cgroup v2 directory `dir`. The
/// attachment lives as long as the cgroup; the program fd is closed here.
pub fn attach(dir: &Path, prog: &[Insn]) -> Result<(), CgroupError> {
    let cgroup = std::fs::File::open(dir).map_err(|source| CgroupError::Io {
        op: "open",
        path: dir.to_path_buf(),
        source,
    })?;
    let license = c"Apache-2.0";
    let mut log = vec![0u8; 16 * 1024];
    let load = ProgLoadAttr {
        prog_type: BPF_PROG_TYPE_CGROUP_DEVICE,
        insn_cnt: u32::try_from(prog.len()).map_err(|_| bad("too many device rules"))?,
        insns: prog.as_ptr() as u64,
        license: license.as_ptr() as u64,
        log_level: 1,
        log_size: log.len() as u32,
        log_buf: log.as_mut_ptr() as u64,
        _rest: [0; 80],
    };
    // SAFETY: `load` is a valid, fully initialised bpf_attr for
    // BPF_PROG_LOAD whose pointers (instructions, license, log buffer) stay
    // alive for the call; the kernel writes only into the log buffer, whose
    // size it is given.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_LOAD,
            &load as *const ProgLoadAttr,
            std::mem::size_of::<ProgLoadAttr>(),
        )
    };
    if fd < 0 {
        let source = std::io::Error::last_os_error();
        let end = log.iter().position(|b| *b == 0).unwrap_or(log.len());
        let verifier = String::from_utf8_lossy(&log[..end]);
        tracing::warn!(dir = %dir.display(), %verifier, "device program rejected");
        return Err(CgroupError::Io {
            op: "load device program for",
            path: dir.to_path_buf(),
            source,
        });
    }
    // SAFETY: bpf(BPF_PROG_LOAD) returned a new descriptor that nothing else
    // owns.
    let prog_fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    let at = ProgAttachAttr {
        target_fd: cgroup.as_raw_fd() as u32,
        attach_bpf_fd: prog_fd.as_raw_fd() as u32,
        attach_type: BPF_CGROUP_DEVICE,
        attach_flags: BPF_F_ALLOW_MULTI,
        _rest: [0; 112],
    };
    // SAFETY: `at` is a valid bpf_attr for BPF_PROG_ATTACH naming two open
    // descriptors we hold for the duration of the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_ATTACH,
            &at as *const ProgAttachAttr,
            std::mem::size_of::<ProgAttachAttr>(),
        )
    };
    if rc < 0 {
        return Err(bpf_err("attach device program to", dir));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_in_devices_allow_syntax_parse() {
        assert_eq!(
            parse("c 1:3 rwm").unwrap(),
            Rule {
                kind: 'c',
                major: Some(1),
                minor: Some(3),
                access: 7
            }
        );
        assert_eq!(
            parse("b *:* m").unwrap(),
            Rule {
                kind: 'b',
                major: None,
                minor: None,
                access: 1
            }
        );
        assert_eq!(parse("a").unwrap().access, 7);
        for bad in [
            "",
            "x 1:3 rwm",
            "c 1 rwm",
            "c 1:3 rwx",
            "c a:3 r",
            "c 1:3 r extra",
        ] {
            assert!(parse(bad).is_err(), "{bad:?} should be rejected");
        }
    }

    #[test]
    fn each_rule_is_a_block_whose_jumps_skip_to_the_next_rule() {
        let p = program(&["c 1:3 rwm".into(), "c 136:* rw".into()]).unwrap();
        // 6 prologue + (type, major, minor, mov, exit) + (type, 3 access, major, mov, exit) + 2.
        assert_eq!(p.len(), 6 + 5 + 7 + 2);
        let first = &p[6..11];
        assert_eq!(first[0].off, 4, "type mismatch skips the whole block");
        assert_eq!(first[1].off, 3);
        assert_eq!(first[2].off, 2);
        assert_eq!((first[3].code, first[3].imm), (MOV64_K, 1));
        assert_eq!(first[4].code, EXIT);
        let second = &p[11..18];
        // mknod is not in "rw": the access mask check tests bit 1 only.
        assert_eq!((second[2].code, second[2].imm), (AND32_K, 1));
        let tail = &p[18..];
        assert_eq!((tail[0].code, tail[0].imm), (MOV64_K, 0), "no match denies");
        assert_eq!(tail[1].code, EXIT);
    }

    #[test]
    fn an_invalid_rule_is_an_error_naming_it() {
        let e = program(&["q 1:1 r".into()]).unwrap_err();
        assert!(e.to_string().contains("q 1:1 r"), "{e}");
    }
}
