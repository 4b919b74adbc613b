# Runs inside the vmhost test host (see bench/microvm/run, which sets N and MEM).
set -u
K=$(uname -r)
KERNEL=/boot/vmlinuz-$K
# One command line for both VMMs: reboot=t ends the VM by a triple fault,
# which both treat as the guest's reset (QEMU with -no-reboot exits).
CMDLINE="console=ttyS0 reboot=t panic=-1 quiet pci=off"

mkdir -p /tmp/img/bin
cp /bin/busybox /tmp/img/bin/busybox
for a in sh true; do ln -sf busybox /tmp/img/bin/$a; done
evoke-guest mkinitramfs -o /tmp/bench.cpio --rootfs /tmp/img --channel virtio-console -- /bin/true || exit 1
echo "bench: guest kernel $KERNEL, initramfs $(wc -c </tmp/bench.cpio) bytes, $MEM MiB, 1 vCPU, $N runs each"

run_qemu() {
  evoke-guest boottime --guest-mem-mib "$MEM" --timeout-s 300 -- \
    qemu-system-x86_64 -M microvm -enable-kvm -cpu host -m "$MEM" -smp 1 \
    -nodefaults -no-user-config -display none -no-reboot -serial stdio \
    -kernel "$KERNEL" -initrd /tmp/bench.cpio -append "$CMDLINE" \
    -device virtio-serial-device -chardev file,id=agent,path=/tmp/qemu.agent \
    -device virtconsole,chardev=agent
}
run_evoke() {
  evoke-guest boottime --guest-mem-mib "$MEM" --timeout-s 300 --console-on-stderr \
    --save-other /tmp/evoke.agent -- \
    evoke vmm --kernel "$KERNEL" --initrd /tmp/bench.cpio --cmdline "$CMDLINE" \
    --memory "$MEM" --cpus 1
}

: >/tmp/qemu.json
: >/tmp/evoke.json
evoke_ok=1
i=0
while [ "$i" -lt "$N" ]; do
  i=$((i + 1))
  run_qemu >>/tmp/qemu.json || echo "bench: qemu run $i failed: $(tail -n1 /tmp/qemu.json)"
  if [ "$i" = 1 ]; then
    evoke-guest decode /tmp/qemu.agent >/dev/null || echo "bench: the workload under qemu did not exit 0"
  fi
  if [ "$evoke_ok" = 1 ]; then
    if ! run_evoke >>/tmp/evoke.json; then
      echo "bench: evoke run $i failed: $(tail -n1 /tmp/evoke.json)"
      evoke_ok=0
    elif [ "$i" = 1 ]; then
      evoke-guest decode /tmp/evoke.agent >/dev/null || echo "bench: the workload under evoke did not exit 0"
    fi
  fi
done

# median FILE FIELD: the median of a numeric JSON field over the runs.
median() {
  sed -n "s/.*\"$2\":\([0-9.]*\).*/\1/p" "$1" | sort -n |
    awk '{ v[NR] = $1 } END { if (NR == 0) print "-"; else if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (a == "-" || b == "-" || b == 0) print "-"; else printf "%.2f", a / b }'; }
vms() { awk -v e="$1" 'BEGIN { if (e == "-" || e == 0) print "-"; else printf "%.2f", 1000 / e }'; }

echo
echo "raw runs (qemu):"; cat /tmp/qemu.json
echo "raw runs (evoke):"; cat /tmp/evoke.json
echo
printf '%-18s %12s %12s %14s\n' metric qemu evoke "evoke/qemu"
for f in init_ms guest_kernel_ms exit_ms vmm_overhead_kib; do
  q=$(median /tmp/qemu.json "$f")
  e=$(median /tmp/evoke.json "$f")
  printf '%-18s %12s %12s %14s\n' "$f" "$q" "$e" "$(ratio "$e" "$q")"
done
qv=$(vms "$(median /tmp/qemu.json exit_ms)")
ev=$(vms "$(median /tmp/evoke.json exit_ms)")
printf '%-18s %12s %12s %14s\n' vms_per_s "$qv" "$ev" "$(ratio "$ev" "$qv")"
qi=$(median /tmp/qemu.json init_ms); qk=$(median /tmp/qemu.json guest_kernel_ms)
ei=$(median /tmp/evoke.json init_ms); ek=$(median /tmp/evoke.json guest_kernel_ms)
awk -v qi="$qi" -v qk="$qk" -v ei="$ei" -v ek="$ek" 'BEGIN {
  if (qi != "-" && qk != "-") printf "qemu:  %.0f ms before the guest kernel started, %.0f ms in the kernel until init (%.0f%%)\n", qi - qk, qk, 100 * qk / qi
  if (ei != "-" && ek != "-") printf "evoke: %.0f ms before the guest kernel started, %.0f ms in the kernel until init (%.0f%%)\n", ei - ek, ek, 100 * ek / ei
}'
[ -s /tmp/qemu.json ] || exit 1
exit 0
