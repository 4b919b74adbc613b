# Runs inside the vmhost test host (see bench/microvm-net/run, which sets MIB).
set -u
K=$(uname -r)
fail() { echo "bench: $*"; exit 1; }

mkdir -p /tmp/img/bin
cp /bin/busybox /tmp/img/bin/busybox
for a in sh cat cut awk wget ping tail nc dd; do ln -sf busybox /tmp/img/bin/$a; done
evoke image build-dir /tmp/img --tag bb >/dev/null || fail "image build-dir"

tunctl -t benchtap >/dev/null || fail "tunctl"
ip addr add 10.77.0.1/24 dev benchtap && ip link set benchtap up || fail "tap address"
mkdir -p /tmp/www
dd if=/dev/zero of=/tmp/www/big bs=1M count="$MIB" 2>/dev/null
httpd -p 10.77.0.1:8080 -h /tmp/www || fail "httpd"
# The tap's counters (rx: frames from the guest), printed after each VMM.
tapstat() {
  s=/sys/class/net/benchtap/statistics
  echo "TAP rx $(cat $s/rx_packets) $(cat $s/rx_bytes) $(cat $s/rx_dropped) tx $(cat $s/tx_packets) $(cat $s/tx_bytes) $(cat $s/tx_dropped)"
}
# The upload sink: each connection's bytes are read and dropped.
nc -ll -p 9000 -e sh -c 'cat >/dev/null' &

# The workload, the same under both VMMs: three timed downloads and three
# timed uploads of MIB MiB (uptime has 10 ms resolution), then ten pings.
WORK="BLOCKS=$((MIB * 16))"'
up() { cut -d" " -f1 /proc/uptime; }
for i in 1 2 3; do
  t0=$(up); wget -q -O /dev/null http://10.77.0.1:8080/big || exit 3; t1=$(up)
  echo "DL $t0 $t1"
done
txstat() { awk -F"[: ]+" "/eth0:/ { print \$11, \$12 }" /proc/net/dev; }
tx0=$(txstat)
for i in 1 2 3; do
  t0=$(up); nc 10.77.0.1 9000 -e sh -c "dd if=/dev/zero bs=64k count=$BLOCKS 2>/dev/null" || exit 4; t1=$(up)
  echo "UL $t0 $t1"
done
echo "TX $tx0 $(txstat)"
awk "/^Tcp:/ { print \"TCP\", \$0 }" /proc/net/snmp
for d in /sys/bus/virtio/devices/*; do [ -f "$d/features" ] && echo "FEAT $(cat "$d/device") $(cat "$d/features")"; done
ping -c 10 -i 0.2 10.77.0.1 | tail -n 1'

# evoke: the microvm tier, the VM kept (no --rm) so QEMU can boot its initramfs.
EVOKE_LOG=warn,evoke_vmm::devices::net=debug evoke run --name netbench --tier microvm --memory 256m --guest-net benchtap,10.77.0.2/24,10.77.0.1 \
  bb sh -c "$WORK" >/tmp/evoke.out 2>/tmp/evoke.err || { cat /tmp/evoke.err; fail "evoke run"; }
dir=$(ls -d /var/lib/evoke/microvm/*/ | head -n 1)
[ -f "$dir/vmm.json" ] || fail "no vmm.json under $dir"
# Diagnostics: the device's counters, the tap's on the host side.
grep -h "virtio-net device thread" "$dir"/console.log
tapstat

# QEMU: the same initramfs parts (concatenated), kernel and command line.
sed -n '/"initrd": \[/,/\]/p' "$dir/vmm.json" | sed -n 's/^ *"\(\/[^"]*\)",\{0,1\}$/\1/p' >/tmp/parts
[ -s /tmp/parts ] || fail "no initrd parts in $dir/vmm.json"
: >/tmp/q.cpio
while read -r p; do cat "$p" >>/tmp/q.cpio; done </tmp/parts
cmdline=$(sed -n 's/^ *"cmdline": "\(.*\)",\{0,1\}$/\1/p' "$dir/vmm.json" | sed 's/reboot=k/reboot=t/')
timeout 300 qemu-system-x86_64 -M microvm -enable-kvm -cpu host -m 256 -smp 1 \
  -nodefaults -no-user-config -display none -no-reboot -serial file:/tmp/q.console \
  -kernel "/boot/vmlinuz-$K" -initrd /tmp/q.cpio -append "$cmdline" \
  -device virtio-serial-device -chardev file,id=agent,path=/tmp/q.agent \
  -device virtconsole,chardev=agent \
  -netdev tap,id=n0,ifname=benchtap,script=no,downscript=no,vnet_hdr=on \
  -device virtio-net-device,netdev=n0,mac=02:65:0a:4d:00:02 </dev/null || fail "qemu"
tapstat
evoke-guest decode /tmp/q.agent >/tmp/qemu.out 2>/tmp/qemu.err || { cat /tmp/qemu.err; tail /tmp/q.console; fail "the workload under qemu"; }

# dl/ul VMM: median MiB/s of the three downloads/uploads; rtt VMM: the average ping.
rate() {
  awk -v mib="$MIB" -v k="$1" '$1 == k { d = $3 - $2; if (d < 0.01) d = 0.01; print mib / d }' "/tmp/$2.out" | sort -n | sed -n 2p
}
dl() { rate DL "$1"; }
ul() { rate UL "$1"; }
rtt() { sed -n 's|.*= [0-9.]*/\([0-9.]*\)/.*|\1|p' "/tmp/$1.out"; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (a == "" || b == "" || b == 0) print "-"; else printf "%.2f", a / b }'; }
echo "raw (evoke):"; cat /tmp/evoke.out
echo "raw (qemu):"; cat /tmp/qemu.out
echo
printf '%-12s %10s %10s %12s\n' metric qemu evoke evoke/qemu
printf '%-12s %10.1f %10.1f %12s\n' dl_mib_s "$(dl qemu)" "$(dl evoke)" "$(ratio "$(dl evoke)" "$(dl qemu)")"
printf '%-12s %10.1f %10.1f %12s\n' ul_mib_s "$(ul qemu)" "$(ul evoke)" "$(ratio "$(ul evoke)" "$(ul qemu)")"
printf '%-12s %10.2f %10.2f %12s\n' rtt_ms "$(rtt qemu)" "$(rtt evoke)" "$(ratio "$(rtt evoke)" "$(rtt qemu)")"
