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
run_evoke_vmm() {
  evoke-guest boottime --guest-mem-mib "$MEM" --timeout-s 300 --console-on-stderr \
    --save-other /tmp/evoke-vmm.agent -- \
    evoke-vmm --kernel "$KERNEL" --initrd /tmp/bench.cpio --cmdline "$CMDLINE" \
    --memory "$MEM" --cpus 1
}

# One VMM's run $2 into /tmp/$1.json; after a failure that VMM is skipped.
measure() {
  name=$1
  i=$2
  [ -e "/tmp/$name.failed" ] && return
  if ! "run_$(echo "$name" | tr - _)" >>"/tmp/$name.json"; then
    echo "bench: $name run $i failed: $(tail -n1 "/tmp/$name.json")"
    touch "/tmp/$name.failed"
  elif [ "$i" = 1 ]; then
    evoke-guest decode "/tmp/$name.agent" >/dev/null || echo "bench: the workload under $name did not exit 0"
  fi
}

vmms="qemu evoke"
command -v evoke-vmm >/dev/null && vmms="$vmms evoke-vmm"
for v in $vmms; do : >"/tmp/$v.json"; done
i=0
while [ "$i" -lt "$N" ]; do
  i=$((i + 1))
  for v in $vmms; do measure "$v" "$i"; done
done

# median FILE FIELD: the median of a numeric JSON field over the runs.
median() {
  sed -n "s/.*\"$2\":\([0-9.]*\).*/\1/p" "$1" | sort -n |
    awk '{ v[NR] = $1 } END { if (NR == 0) print "-"; else if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (a == "-" || b == "-" || b == 0) print "-"; else printf "%.2f", a / b }'; }
vms() { awk -v e="$1" 'BEGIN { if (e == "-" || e == 0) print "-"; else printf "%.2f", 1000 / e }'; }

echo
for v in $vmms; do echo "raw runs ($v):"; cat "/tmp/$v.json"; done
echo
header=$(printf '%-18s' metric)
for v in $vmms; do header="$header$(printf ' %12s' "$v")"; done
for v in $vmms; do [ "$v" = qemu ] || header="$header$(printf ' %16s' "$v/qemu")"; done
echo "$header"
row() { # row NAME VALUE-PER-VMM...: values in $vmms order, then ratios to qemu
  name=$1; shift
  line=$(printf '%-18s' "$name")
  for x in "$@"; do line="$line$(printf ' %12s' "$x")"; done
  q=$1; shift
  for x in "$@"; do line="$line$(printf ' %16s' "$(ratio "$x" "$q")")"; done
  echo "$line"
}
for f in init_ms guest_kernel_ms exit_ms vmm_overhead_kib; do
  vals=
  for v in $vmms; do vals="$vals $(median "/tmp/$v.json" "$f")"; done
  row "$f" $vals
done
vals=
for v in $vmms; do vals="$vals $(vms "$(median "/tmp/$v.json" exit_ms)")"; done
row vms_per_s $vals
for v in $vmms; do
  awk -v n="$v" -v i="$(median "/tmp/$v.json" init_ms)" -v k="$(median "/tmp/$v.json" guest_kernel_ms)" 'BEGIN {
    if (i != "-" && k != "-") printf "%s: %.0f ms before the guest kernel started, %.0f ms in the kernel until init (%.0f%%)\n", n, i - k, k, 100 * k / i
  }'
done
[ -s /tmp/qemu.json ] || exit 1
exit 0
