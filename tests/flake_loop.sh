#!/usr/bin/env bash
# Run the test suite (or the tests named after --) several times to hunt flaky tests.
#
#   tests/flake_loop.sh [-n RUNS] [-b BURNERS] [-r] [-o LOGDIR] [-- PYTEST_ARGS...]
#
#   -n RUNS     how many runs (default 5)
#   -b BURNERS  keep BURNERS CPU burners (python -c 'while True: pass') busy in the background during the runs,
#               killed at the end (default 0); 2 keeps both cores of a 2-core machine busy
#   -r          random test order, a fresh seed per run: pytest-randomly (--randomly-seed) or pytest-random-order
#               (--random-order-seed) when one is installed, else tests/conftest.py's own --shuffle-seed
#   -o LOGDIR   where each run's output goes (default: a new temporary folder); run<i>.log per run
#
# Every run prints its counts (passed / failed / errors / skipped), its time and its seed; a closing table
# lists the runs and the tests that failed in any of them. The exit status is 0 when every run passed.
# PYTHON (default: python) picks the interpreter; FLAKE_BURNER replaces the burner's command (for a dry run
# of the script itself, e.g. FLAKE_BURNER='sleep 600').
#
# Examples:
#   tests/flake_loop.sh -n 5 -r              # the full suite five times in random order
#   tests/flake_loop.sh -n 2 -b 2            # twice while both cores are busy
#   tests/flake_loop.sh -n 1 -- tests/quant/test_spec.py
set -uo pipefail

runs=5
burners=0
random_order=0
logdir=""
while getopts "n:b:ro:h" opt; do
  case "$opt" in
    n) runs=$OPTARG ;;
    b) burners=$OPTARG ;;
    r) random_order=1 ;;
    o) logdir=$OPTARG ;;
    h) sed -n '2,22p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "usage: $0 [-n RUNS] [-b BURNERS] [-r] [-o LOGDIR] [-- PYTEST_ARGS...]" >&2; exit 2 ;;
  esac
done
shift $((OPTIND - 1))
case "$runs$burners" in
  *[!0-9]*) echo "$0: -n and -b take whole numbers" >&2; exit 2 ;;
esac
[ "$runs" -ge 1 ] || { echo "$0: -n must be at least 1" >&2; exit 2; }

cd "$(dirname "$0")/.." || exit 2
py=${PYTHON:-python}
burner=${FLAKE_BURNER:-"$py -c 'while True: pass'"}
[ -n "$logdir" ] || logdir=$(mktemp -d "${TMPDIR:-/tmp}/flake_loop.XXXXXX")
mkdir -p "$logdir"

has() { "$py" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('$1') is None)" 2>/dev/null; }
order_plugin=none
if has pytest_randomly; then order_plugin=randomly; elif has random_order; then order_plugin=random_order; fi
order=file
if [ "$random_order" = 1 ]; then
  [ "$order_plugin" = none ] && order="random via --shuffle-seed (tests/conftest.py)" || order="random via $order_plugin"
fi

burner_pids=()
stop_burners() {
  for pid in "${burner_pids[@]}"; do
    kill "$pid" 2>/dev/null && wait "$pid" 2>/dev/null
  done
  burner_pids=()
}
trap stop_burners EXIT
trap 'stop_burners; exit 130' INT TERM
for _ in $(seq 1 "$burners"); do
  bash -c "exec $burner" &
  burner_pids+=("$!")
done
[ "$burners" -gt 0 ] && echo "flake_loop: $burners CPU burner(s) running (pids ${burner_pids[*]})"
# every tier unless the arguments pick one (plain pytest runs the fast tier only: pyproject's addopts)
tier_args=(-m "slow or not slow")
for a in "$@"; do
  case "$a" in -m|-m*) tier_args=() ;; esac
done
echo "flake_loop: $runs run(s) of: $py -m pytest ${tier_args[*]} $* (logs in $logdir)"

count() {  # count WORD FILE: the number before WORD in pytest's closing summary line, 0 when absent
  local line
  line=$(grep -E '(passed|failed|errors?|skipped|deselected|no tests ran).* in [0-9.]+s( \(.*\))?( =+)?$' "$2" | tail -n 1)
  echo "$line" | grep -oE "[0-9]+ $1" | grep -oE '^[0-9]+' || echo 0
}

clean=0
summary=()
for i in $(seq 1 "$runs"); do
  seed=-
  order_args=()
  if [ "$order_plugin" = randomly ]; then
    if [ "$random_order" = 1 ]; then seed=$RANDOM$RANDOM; order_args=(-p randomly "--randomly-seed=$seed")
    else order_args=(-p no:randomly); fi
  elif [ "$order_plugin" = random_order ] && [ "$random_order" = 1 ]; then
    seed=$RANDOM$RANDOM; order_args=("--random-order-seed=$seed")
  elif [ "$random_order" = 1 ]; then
    seed=$RANDOM$RANDOM; order_args=("--shuffle-seed=$seed")
  fi
  log="$logdir/run$i.log"
  t0=$(date +%s)
  "$py" -m pytest -p no:cacheprovider "${tier_args[@]}" "${order_args[@]}" "$@" >"$log" 2>&1
  rc=$?
  dt=$(( $(date +%s) - t0 ))
  p=$(count passed "$log"); f=$(count failed "$log"); e=$(count error "$log"); s=$(count skipped "$log")
  line="run $i/$runs: rc=$rc passed=$p failed=$f errors=$e skipped=$s time=${dt}s seed=$seed"
  echo "$line"
  summary+=("$line")
  if [ "$rc" = 0 ]; then clean=$((clean + 1)); else grep -E '^(FAILED|ERROR) ' "$log" | sed 's/^/    /'; fi
done
stop_burners

echo
echo "flake_loop: $clean of $runs run(s) passed (burners: $burners, order: $order)"
printf '  %s\n' "${summary[@]}"
failing=$(cat "$logdir"/run*.log | grep -E '^(FAILED|ERROR) ' | sed -E 's/ - .*//' | sort | uniq -c | sort -rn)
if [ -n "$failing" ]; then
  echo "tests that failed (how many runs):"
  echo "$failing" | sed 's/^/  /'
fi
[ "$clean" = "$runs" ]
