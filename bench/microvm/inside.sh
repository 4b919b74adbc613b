# Runs inside the vmhost test host (see bench/microvm/run, which sets N and MEM).
set -u
K=$(uname -r)
BZIMAGE=/boot/vmlinuz-$K
# The uncompressed vmlinux of the same kernel, when bench/microvm/run put it in.
VMLINUX=/vmhost/extra/vmlinux
# One command line for both VMMs: reboot=t ends the VM by a triple fault,
# which both treat as the guest's reset (QEMU with -no-reboot exits);
# cryptomgr.notests skips the crypto self-tests, as the microvm tier's
# command line does (crates/evoke-vmm/src/tier.rs).
CMDLINE="console=ttyS0 reboot=t panic=-1 quiet pci=off cryptomgr.notests"

mkdir -p /tmp/img/bin
cp /bin/busybox /tmp/img/bin/busybox
for a in sh true; do ln -sf busybox /tmp/img/bin/$a; done
evoke-guest mkinitramfs -o /tmp/bench.cpio --rootfs /tmp/img --channel virtio-console -- /bin/true || exit 1
fmts=bzimage
[ -f "$VMLINUX" ] && fmts="bzimage vmlinux"
echo "bench: guest kernel $BZIMAGE (formats: $fmts), initramfs $(wc -c </tmp/bench.cpio) bytes, $MEM MiB, 1 vCPU, $N runs each"

# QEMU_MACHINE (from bench/microvm/run's BENCH_QEMU_MACHINE) picks QEMU's
# machine options; "microvm,rtc=off" drops the RTC whose probe (cmos_init)
# costs QEMU's guest seconds under nested TCG, where evoke emulates none.
run_qemu() {
  evoke-guest boottime --guest-mem-mib "$MEM" --timeout-s 300 -- \
    qemu-system-x86_64 -M "${QEMU_MACHINE:-microvm}" -enable-kvm -cpu host -m "$MEM" -smp 1 \
    -nodefaults -no-user-config -display none -no-reboot -serial stdio \
    -kernel "$KERNEL" -initrd /tmp/bench.cpio -append "$CMDLINE" \
    -device virtio-serial-device -chardev file,id=agent,path=/tmp/qemu.agent \
    -device virtconsole,chardev=agent
}
run_evoke() {
  evoke-guest boottime --guest-mem-mib "$MEM" --timeout-s 300 --console-on-stderr \
    --save-other /tmp/evoke.agent -- \
    evoke vmm --kernel "$KERNEL" --boot-protocol "$PROTO" --initrd /tmp/bench.cpio \
    --cmdline "$CMDLINE" --memory "$MEM" --cpus 1
}
run_evoke_vmm() {
  evoke-guest boottime --guest-mem-mib "$MEM" --timeout-s 300 --console-on-stderr \
    --save-other /tmp/evoke-vmm.agent -- \
    evoke-vmm --kernel "$KERNEL" --boot-protocol "$PROTO" --initrd /tmp/bench.cpio \
    --cmdline "$CMDLINE" --memory "$MEM" --cpus 1
}

# set_format FMT: the kernel file and evoke boot protocol of one format.
set_format() {
  case $1 in
    bzimage) KERNEL=$BZIMAGE PROTO=auto ;;
    vmlinux) KERNEL=$VMLINUX PROTO=pvh ;;
  esac
}

# One VMM's run $3 on format $2 into /tmp/$1-$2.json; after a failure that
# VMM is skipped on that format.
measure() {
  name=$1
  fmt=$2
  i=$3
  out=/tmp/$name-$fmt
  [ -e "$out.failed" ] && return
  set_format "$fmt"
  echo "bench: run $i/$N: $name ($fmt)"
  if ! "run_$(echo "$name" | tr - _)" >>"$out.json"; then
    echo "bench: $name ($fmt) run $i failed: $(tail -n1 "$out.json")"
    touch "$out.failed"
  elif [ "$i" = 1 ]; then
    evoke-guest decode "/tmp/$name.agent" >/dev/null || echo "bench: the workload under $name ($fmt) did not exit 0"
  fi
}

vmms="qemu evoke"
command -v evoke-vmm >/dev/null && vmms="$vmms evoke-vmm"
for f in $fmts; do for v in $vmms; do : >"/tmp/$v-$f.json"; done; done
# Runs alternate over VMMs and formats, so load changes on the shared machine
# spread over all of them alike.
i=0
while [ "$i" -lt "$N" ]; do
  i=$((i + 1))
  for f in $fmts; do for v in $vmms; do measure "$v" "$f" "$i"; done; done
done

# median FILE FIELD: the median of a numeric JSON field over the runs.
median() {
  sed -n "s/.*\"$2\":\([0-9.]*\).*/\1/p" "$1" | sort -n |
    awk '{ v[NR] = $1 } END { if (NR == 0) print "-"; else if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}
# spread FILE FIELD: min-max of a numeric JSON field over the runs.
spread() {
  sed -n "s/.*\"$2\":\([0-9.]*\).*/\1/p" "$1" | sort -n |
    awk 'NR == 1 { lo = $1 } { hi = $1 } END { if (NR == 0) print "-"; else printf "%.0f-%.0f", lo, hi }'
}
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (a == "-" || b == "-" || b == 0) print "-"; else printf "%.2f", a / b }'; }
vms() { awk -v e="$1" 'BEGIN { if (e == "-" || e == 0) print "-"; else printf "%.2f", 1000 / e }'; }

echo
for f in $fmts; do for v in $vmms; do echo "raw runs ($v, $f):"; cat "/tmp/$v-$f.json"; done; done
row() { # row NAME VALUE-PER-VMM...: values in $vmms order, then ratios to qemu
  name=$1; shift
  line=$(printf '%-18s' "$name")
  for x in "$@"; do line="$line$(printf ' %12s' "$x")"; done
  q=$1; shift
  for x in "$@"; do line="$line$(printf ' %16s' "$(ratio "$x" "$q")")"; done
  echo "$line"
}
for fmt in $fmts; do
  echo
  case $fmt in
    bzimage) echo "== bzImage ($BZIMAGE): QEMU's guest decompresses it; evoke unpacks its LZ4 payload into guest memory and enters through PVH" ;;
    vmlinux) echo "== vmlinux (uncompressed ELF, the microvm tier's path): PVH entry in both VMMs" ;;
  esac
  header=$(printf '%-18s' metric)
  for v in $vmms; do header="$header$(printf ' %12s' "$v")"; done
  for v in $vmms; do [ "$v" = qemu ] || header="$header$(printf ' %16s' "$v/qemu")"; done
  echo "$header"
  for f in init_ms guest_kernel_ms exit_ms vmm_overhead_kib; do
    vals=
    for v in $vmms; do vals="$vals $(median "/tmp/$v-$fmt.json" "$f")"; done
    row "$f" $vals
  done
  vals=
  for v in $vmms; do vals="$vals $(vms "$(median "/tmp/$v-$fmt.json" exit_ms)")"; done
  row vms_per_s $vals
  line=$(printf '%-18s' "init_ms min-max")
  for v in $vmms; do line="$line$(printf ' %12s' "$(spread "/tmp/$v-$fmt.json" init_ms)")"; done
  echo "$line"
  for v in $vmms; do
    awk -v n="$v" -v i="$(median "/tmp/$v-$fmt.json" init_ms)" -v k="$(median "/tmp/$v-$fmt.json" guest_kernel_ms)" 'BEGIN {
      if (i != "-" && k != "-") printf "%s: %.0f ms before the guest kernel started, %.0f ms in the kernel until init (%.0f%%)\n", n, i - k, k, 100 * k / i
    }'
  done
done
# Each VMM's vmlinux time to init over its bzImage one: what skipping the
# guest's self-decompression saves on each.
case $fmts in *vmlinux*)
  echo
  echo "vmlinux/bzImage, init_ms medians:"
  for v in $vmms; do
    echo "  $v: $(ratio "$(median "/tmp/$v-vmlinux.json" init_ms)" "$(median "/tmp/$v-bzimage.json" init_ms)")"
  done
  ;;
esac
[ -s /tmp/qemu-bzimage.json ] || exit 1
exit 0
