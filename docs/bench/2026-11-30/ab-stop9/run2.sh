#!/bin/bash
pick() { ls -t $1/release/deps/$2-* | grep -v '\.d$' | head -1; }
for round in 1 2 3; do
  for side in old new; do
    if [ $side = old ]; then T=/tmp/ab-old-target; else T=/work/main/target; fi
    for b in sip auth; do
      bin=$(pick $T $b)
      echo "== round $round $side $b"
      $bin --bench 'proxy_edit|authorize_invite' --warm-up-time 1 --measurement-time 4 --noplot 2>&1 | grep -E "^[a-z_/+0-9]+ *$|time:   \[[0-9]" || true
    done
  done
done
