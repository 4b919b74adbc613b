//! KVM microVM monitor: guest memory, vCPUs, boot, serial and virtio-mmio devices.
