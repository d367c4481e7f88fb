#!/bin/bash
# A/B of this stop's hot-path changes (eleventh stop): ad8d3f0 (old, built in a worktree with its own
# target directory) against HEAD (new), alternating three rounds in one script.
#   git worktree add /tmp/ab-old ad8d3f0
#   (cd /tmp/ab-old && CARGO_TARGET_DIR=/tmp/ab-old-target cargo bench -p sipring-benches --bench sip --bench auth --bench tables --no-run)
#   cargo bench -p sipring-benches --bench sip --bench auth --bench tables --no-run
#   docs/bench/2026-12-01/ab-stop11/run.sh > docs/bench/2026-12-01/ab-stop11/raw.txt
pick() { ls -t $1/release/deps/$2-* | grep -v '\.d$' | head -1; }
for round in 1 2 3; do
  for side in old new; do
    if [ $side = old ]; then T=/tmp/ab-old-target; else T=/work/main/target; fi
    for b in sip auth tables; do
      bin=$(pick $T $b)
      echo "== round $round $side $b"
      $bin --bench 'proxy_edit|authorize_invite|register_refresh/1000$|register_refresh/1000000|registrar_100k/lookup' \
        --warm-up-time 1 --measurement-time 4 --noplot 2>&1 | grep -E "^[a-z_/+0-9]+ *$|time:   \[[0-9]" || true
    done
  done
done
