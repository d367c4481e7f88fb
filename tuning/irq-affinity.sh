#!/usr/bin/env bash
# Steer NIC interrupts and receive processing away from the shard CPUs.
#
#   irq-affinity.sh IFACE HOUSEKEEPING_CPUS
#   e.g. irq-affinity.sh eth0 0-1        # shards on 2-15 (server.first_cpu = 2)
#
# Shards busy-run their io_uring loops; sharing their CPUs with hard IRQs and softirq
# (RPS/RFS) work adds tail latency. This pins the NIC's IRQs and RPS to the housekeeping CPUs.
# Prints what it changes. Run as root. irqbalance would undo it: stop it or ban those IRQs.
set -euo pipefail
iface=${1:?interface}; cpus=${2:?cpu list, e.g. 0-1}
mask=$(python3 -c "import sys
s=0
for part in sys.argv[1].split(','):
    a,_,b=part.partition('-'); b=b or a
    for c in range(int(a),int(b)+1): s|=1<<c
print(format(s,'x'))" "$cpus")
for irq in $(grep -E "$iface" /proc/interrupts | awk -F: '{print $1}' | tr -d ' '); do
  echo "irq $irq -> cpus $cpus"; echo "$cpus" > "/proc/irq/$irq/smp_affinity_list"
done
for q in /sys/class/net/"$iface"/queues/rx-*/rps_cpus; do
  [ -e "$q" ] || continue; echo "$q -> $mask"; echo "$mask" > "$q"
done
