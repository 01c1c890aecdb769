#!/usr/bin/env bash
# Runs INSIDE a kernel booted by scripts/kernel-matrix (virtme-ng: the host's root
# filesystem, read-only, over 9p; /tmp an in-guest overlay; OUT a read-write 9p share
# with the host). Not meant to be run by hand.
#
#   _kernel_matrix_inner.sh OUT suite        doctor check, tests marked for other kernels, demos
#   _kernel_matrix_inner.sh OUT exec CMD...  CMD (a shell string) in the repo, its status is ours
#
# Results for the host go to OUT: status (suite: 0 or 1; exec: CMD's status), result.txt
# (one "key: value" line per step), the JUnit XML and JSON of each step.
set -uo pipefail

OUT=$1
MODE=$2
shift 2
REPO=$(cd "$(dirname "$0")/.." && pwd)
REL=$(uname -r)
cd "$REPO" || exit 1

# Debian's python3 is first on the guest's PATH; the project runs from its own venv.
export PATH="$REPO/.venv/bin:$PATH"
PY="$REPO/.venv/bin/python"
# The root filesystem is read-only here: the host compiled the bytecode beforehand, the
# pytest cache is off, temporary files go to the in-guest /tmp overlay (RAM).
export PYTHONDONTWRITEBYTECODE=1 TMPDIR=/tmp
export PYTHONUNBUFFERED=1

FAILED=0
say() { echo "== kernel $REL: $*"; }
took() { echo "$((SECONDS - $1)) s"; }
record() { echo "$1: $2" >>"$OUT/result.txt"; }
fail() { say "FAILED: $1"; record failed "$1"; FAILED=1; }

# KM_* settings from the host (scripts/kernel-matrix writes them here).
# shellcheck disable=SC1091
[ ! -r "$OUT/env" ] || . "$OUT/env"
: >"$OUT/result.txt"
echo "$REL" >"$OUT/kernel"
read -r up _ </proc/uptime
say "up ${up%.*} s after boot (nproc $(nproc), $(awk '/MemTotal/ {print int($2/1024) " MiB"}' /proc/meminfo))"

if [ "$MODE" = exec ]; then
    export BENCH_JSON="$OUT/bench.json" KM_OUT="$OUT"
    say "running: $*"
    bash -c "$*"
    rc=$?
    say "exit status $rc"
    record exec "$rc"
    echo "$rc" >"$OUT/status"
    exit "$rc"
fi

# No pytest cache (read-only tree). Tests may read POSTCOPY_KERNEL_MATRIX to keep their
# guests small: everything here runs under software emulation.
export POSTCOPY_KERNEL_MATRIX=1
PYTEST=("$PY" -m pytest -p no:cacheprovider -q -rfEs --durations=5)

# 1. The doctor must see soft-dirty on this kernel (the reason for booting it).
say "running postcopy doctor --json (soft-dirty must be reported available)"
if postcopy doctor --json >"$OUT/doctor.json"; then
    verdict=$("$PY" - "$OUT/doctor.json" <<'EOF'
import json, sys
probes = {p["name"]: p for p in json.load(open(sys.argv[1]))["probes"]}
for name in ("soft_dirty", "pagemap_scan", "uffd_api", "netns"):
    p = probes.get(name)
    print(f"   {name}: {'OK' if p and p['ok'] else 'NO'}  {p['detail'] if p else 'probe missing'}", file=sys.stderr)
sd = probes.get("soft_dirty")
print("available" if sd and sd["ok"] else "unavailable")
EOF
    )
    if [ "$verdict" = available ]; then
        say "doctor: soft-dirty available"
        record doctor "soft-dirty available"
    else
        fail "doctor does not report soft-dirty available"
    fi
else
    fail "postcopy doctor --json exited $?"
fi

# 2. A sanity set that must pass on any kernel, then every test marked for this matrix.
say "running pytest sanity set: tests/test_doctor.py tests/test_uffd.py"
t0=$SECONDS
"${PYTEST[@]}" -n 0 --junitxml="$OUT/sanity.xml" tests/test_doctor.py tests/test_uffd.py
rc=$?
say "pytest sanity set: exit $rc in $(took $t0)"
[ "$rc" -eq 0 ] || fail "pytest sanity set exited $rc"

say "running pytest -m \"softdirty or precopy\" ${KM_PYTEST_ARGS:-}"
# KM_PYTEST_ARGS: extra arguments from scripts/kernel-matrix --pytest-args, split as
# the shell would (so -k "not slow" works).
extra=()
eval "extra=(${KM_PYTEST_ARGS:-})"
t0=$SECONDS
"${PYTEST[@]}" -n "${KM_WORKERS:-0}" --junitxml="$OUT/marked.xml" -m "softdirty or precopy" "${extra[@]}" tests
rc=$?
say "pytest -m \"softdirty or precopy\": exit $rc in $(took $t0)"
case $rc in
    0) ;;
    5) say "no test selected: none is marked softdirty or precopy${KM_PYTEST_ARGS:+, or $KM_PYTEST_ARGS left none} (pytest exit 5)"
       record marked "none collected (exit 5)"
       rm -f "$OUT/marked.xml" ;;
    *) fail "pytest -m \"softdirty or precopy\" exited $rc" ;;
esac

# 3. A whole migration with the soft-dirty log, verified against the reference hash.
# Under software emulation a Python process needs ~10 s to start, so the guest runs
# ~24 s (12M steps at 500k/s; unthrottled it does ~800k/s here) to outlive the agents'
# start-up and the precopy rounds. KM_DEMO_MODES="precopy hybrid" adds the precopy demo.
help=$(postcopy demo --help 2>&1)
if [ -z "${KM_DEMO_MODES-hybrid}" ]; then
    say "no demo: none requested (--demo-modes \"\")"
    record demo "none requested"
fi
for mode in ${KM_DEMO_MODES-hybrid}; do  # set but empty: no demo
    if ! grep -Eq -- "--mode \{[^}]*\b$mode\b" <<<"$help"; then
        say "SKIPPED demo --mode $mode: postcopy demo has no --mode $mode yet"
        record "demo-$mode" "skipped (no --mode $mode in postcopy demo)"
        continue
    fi
    args=(--mode "$mode" --dirty-log soft-dirty --ram 16M --threads 1 --workload random-write
          --steps "${KM_DEMO_STEPS:-12000000}" --rate 500000 --migrate-after 0.5 --json "$OUT/demo-$mode.json")
    say "running postcopy demo ${args[*]}"
    t0=$SECONDS
    postcopy demo "${args[@]}" >"$OUT/demo-$mode.txt" 2>&1
    rc=$?
    check=$("$PY" - "$OUT/demo-$mode.json" <<'EOF' 2>&1
import json, sys
try:
    r = json.load(open(sys.argv[1]))
except (OSError, ValueError) as exc:
    print(f"no report ({exc.__class__.__name__})")
else:
    log = r.get("dirty_log")
    print("verified" if r.get("verified") and log == "soft-dirty"
          else f"verified={r.get('verified')} dirty_log={log}")
EOF
    )
    if [ "$rc" -eq 0 ] && [ "$check" = verified ]; then
        grep -E 'downtime|rounds|final hash' "$OUT/demo-$mode.txt" | head -n 4
        say "demo --mode $mode --dirty-log soft-dirty: VERIFIED in $(took $t0)"
        record "demo-$mode" verified
    else
        tail -n 15 "$OUT/demo-$mode.txt"
        fail "demo --mode $mode --dirty-log soft-dirty: exit $rc, $check"
    fi
done

echo "$FAILED" >"$OUT/status"
exit "$FAILED"
