//! Can this host run microVMs? Checked before anything else so the user gets
//! one line saying why not.

use std::path::Path;

use crate::error::VmmError;

/// Opens /dev/kvm, mapping the usual failures to actionable errors.
pub fn open_kvm() -> Result<kvm_ioctls::Kvm, VmmError> {
    open_kvm_at(Path::new("/dev/kvm"))
}

fn open_kvm_at(dev: &Path) -> Result<kvm_ioctls::Kvm, VmmError> {
    match std::fs::OpenOptions::new().read(true).write(true).open(dev) {
        Ok(f) => {
            // Kvm::from_raw_fd needs unsafe; reopen through the crate instead.
            drop(f);
            kvm_ioctls::Kvm::new().map_err(|e| VmmError::KvmOpen(e.into()))
        }
        Err(e) => Err(classify_open_error(e)),
    }
}

fn classify_open_error(e: std::io::Error) -> VmmError {
    match e.kind() {
        std::io::ErrorKind::NotFound => VmmError::KvmMissing,
        std::io::ErrorKind::PermissionDenied => VmmError::KvmPermission,
        _ => VmmError::KvmOpen(e),
    }
}

/// True when the host's KVM is PVM, which can run only guests that avoid
/// the instructions it cannot emulate (fine for the tests' tiny guests, not
/// for a Linux kernel).
pub fn is_pvm_host() -> bool {
    is_pvm_at(Path::new("/sys/module"))
}

fn is_pvm_at(sys_module: &Path) -> bool {
    sys_module.join("kvm_pvm").exists()
}

/// Whether this host can boot a Linux guest: /dev/kvm opens and is not PVM.
pub fn check_linux_guest_support() -> Result<(), VmmError> {
    let kvm = open_kvm()?;
    if is_pvm_host() {
        return Err(VmmError::PvmHost);
    }
    if kvm.get_api_version() != 12 {
        return Err(VmmError::Setup("unsupported kvm api version (want 12)"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_device_and_permission_errors_say_what_to_do() {
        let missing = classify_open_error(std::io::Error::from(std::io::ErrorKind::NotFound));
        assert!(missing.to_string().contains("kvm_intel or kvm_amd"));
        let denied =
            classify_open_error(std::io::Error::from(std::io::ErrorKind::PermissionDenied));
        assert!(denied.to_string().contains("kvm group"));
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(
            open_kvm_at(&dir.path().join("kvm")),
            Err(VmmError::KvmMissing)
        ));
    }

    #[test]
    fn pvm_is_detected_from_its_module_directory() {
        let dir = tempfile::tempdir().unwrap();
        assert!(!is_pvm_at(dir.path()));
        std::fs::create_dir(dir.path().join("kvm_pvm")).unwrap();
        assert!(is_pvm_at(dir.path()));
        let msg = VmmError::PvmHost.to_string();
        assert!(msg.contains("PVM") && msg.contains("VT-x"), "{msg}");
        assert_eq!(msg.lines().count(), 1);
    }
}
