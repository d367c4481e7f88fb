# Shared by the bench scripts (source it after `cd` to the repository root):
#   allowed_cpus              the CPUs this process may use, sorted (sched_getaffinity)
#   build_bins                release sipring and sipring-load; sets SIPRING and LOAD
#   cpu_cgroup NAME PCT N     a CPU cgroup holding its members to PCT % of a CPU on each of
#                             N CPUs (CFS quota in 1 ms slices; cgroup v2 or v1); sets CG
#   cgroup_cleanup            removes $CG once its last member has gone (for the EXIT trap)
#   "${CG_RUN[@]}" CMD...     runs CMD inside $CG (when set): it joins before it execs, so
#                             every thread it starts is held too, and `$!` of `... &` is
#                             CMD's own pid (each step execs)
#   threads PID...            each thread's name=Cpus_allowed_list, for placement records
#   ladder_step TAG SERVER_CMD... -- LOAD_ARGS...
#                             one step of a rate ladder: the server (inside $CG, log in
#                             $W/TAG.log), 1 s later the generator on $LOAD_CPU with
#                             LOAD_ARGS (--quiet, --json $OUT/TAG.json, output TAG.txt), both
#                             processes' placement into $OUT/placement.txt, then it waits
#                             for the generator and stops the server
#   tls_server_toml FILE PKI ADDR SHARDS SERVER_LINES [TOML...]
#                             a sipring config: one TLS listener with the PKI's certificate,
#                             no authentication, limits fit for a generator that is one
#                             address; SERVER_LINES (newline-separated, may be empty) go
#                             under [server], further lines under [limits] unless they open
#                             a table themselves
#   tcp_server_toml FILE ADDR SHARDS SERVER_LINES [TOML...]
#                             the same with one plain TCP listener
# Nothing here starts a process that outlives the caller's trap.

allowed_cpus() { python3 -c 'import os; print(*sorted(os.sched_getaffinity(0)))'; }

build_bins() {
  cargo build --release -p sipring -p sipring-load >/dev/null 2>&1
  local target=${CARGO_TARGET_DIR:-$PWD/target}
  SIPRING=$target/release/sipring
  LOAD=$target/release/sipring-load
}

cpu_cgroup() { # NAME PCT NCPUS
  local name=$1 pct=$2 n=${3:-1}
  local quota=$((n * 1000)) period=$((100000 / pct)) # the kernel's least quota is 1 ms
  if [ -f /sys/fs/cgroup/cgroup.controllers ]; then
    CG=/sys/fs/cgroup/$name-$$
    echo +cpu > /sys/fs/cgroup/cgroup.subtree_control 2>/dev/null || true
    mkdir "$CG" && echo "$quota $period" > "$CG/cpu.max"
  else
    CG=/sys/fs/cgroup/cpu/$name-$$
    mkdir "$CG" && echo "$period" > "$CG/cpu.cfs_period_us" && echo "$quota" > "$CG/cpu.cfs_quota_us"
  fi
  cg_run_set
}

cgroup_cleanup() {
  [ -n "${CG:-}" ] || return 0
  local i
  for i in 1 2 3 4 5 6 7 8 9 10; do rmdir "$CG" 2>/dev/null && return 0; sleep 0.5; done
  echo "left behind: $CG" >&2
}

CG=${CG:-}
cg_run_set() { CG_RUN=(env CG="$CG" sh -c '[ -z "$CG" ] || echo $$ > "$CG/cgroup.procs"; exec "$@"' sh); }
cg_run_set

threads() {
  local p t
  for p in "$@"; do
    for t in /proc/"$p"/task/*; do
      printf '%s=%s ' "$(cat "$t/comm")" "$(awk '/Cpus_allowed_list/{print $2}' "$t/status")"
    done
  done 2>/dev/null
}

ladder_step() { # TAG SERVER_CMD... -- LOAD_ARGS...
  local tag=$1 srv=() sp lp
  shift
  while [ "$1" != "--" ]; do srv+=("$1"); shift; done
  shift
  SIPRING_LOG=warn "${CG_RUN[@]}" "${srv[@]}" >"$W/$tag.log" 2>&1 &
  sp=$!
  sleep 1
  taskset -c "$LOAD_CPU" "$LOAD" "$@" --quiet --json "$OUT/$tag.json" >"$OUT/$tag.txt" 2>&1 &
  lp=$!
  sleep 2
  echo "$tag server: $(threads $sp) generator: $(threads $lp)" >> "$OUT/placement.txt"
  wait $lp || true
  kill $sp 2>/dev/null || true # (a server that died early must not end the ladder)
  wait $sp 2>/dev/null || true
}

server_toml() { # FILE SHARDS SERVER_LINES LISTEN_TOML [TOML...]
  local file=$1 shards=$2 server=$3 listen=$4
  shift 4
  {
    cat <<CFG
[server]
shards = $shards
$server
domains = ["example.com"]
hostname = "sip.example.com"
local_hosts = ["127.0.0.1"]
$listen
[auth]
enabled = false
[limits]
max_connections_per_ip = 1000000
max_handshakes_in_flight = 100000
max_handshakes_per_ip = 100000
max_handshakes_per_ip_per_s = 0
CFG
    printf '%s\n' "$@"
  } > "$file"
}

tls_server_toml() { # FILE PKI ADDR SHARDS SERVER_LINES [TOML...]
  local file=$1 pki=$2 addr=$3 shards=$4 server=$5
  shift 5
  server_toml "$file" "$shards" "$server" "[[listen]]
kind = \"tls\"
address = \"$addr\"
[[tls.certificate]]
cert = \"$pki/server.pem\"
key = \"$pki/server.key\"
sni = [\"sip.example.com\"]" "$@"
}

tcp_server_toml() { # FILE ADDR SHARDS SERVER_LINES [TOML...]
  local file=$1 addr=$2 shards=$3 server=$4
  shift 4
  server_toml "$file" "$shards" "$server" "[[listen]]
kind = \"tcp\"
address = \"$addr\"" "$@"
}
