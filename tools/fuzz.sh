#!/bin/sh
# SPDX-License-Identifier: GPL-2.0
#
# The fuzzers at length, inside the test VM: JOBS pytest processes side by
# side (the VM has a vCPU per host core), each on its own edu function and
# with its share of EXAMPLES stateful programs and MALFORMED malformed
# calls. Session names carry the process's pid, so the processes do not
# meet in the module's namespaces.
#
#   tools/fuzz.sh PYTHON JOBS EXAMPLES MALFORMED LOGDIR [PYTEST_ARGS...]
#
# Exits non-zero if any process failed; each one's output is in
# LOGDIR/fuzz-N.log and printed at the end, with the sums of what ran
# (programs, their steps, malformed calls; LOGDIR/stats-N.json).

set -u

py=${1:?usage: $0 PYTHON JOBS EXAMPLES MALFORMED LOGDIR [PYTEST_ARGS...]}
jobs=${2:?}
examples=${3:?}
malformed=${4:?}
logdir=${5:?}
shift 5
per=$(( (examples + jobs - 1) / jobs ))
per_malformed=$(( (malformed + jobs - 1) / jobs ))
cd "$(dirname "$0")/.."
mkdir -p "$logdir"

echo "fuzz: $jobs processes x $per programs and $per_malformed malformed calls, started $(date +%T)"
start=$(date +%s)
rm -f "$logdir"/stats-*.json
pids=
i=0
while [ "$i" -lt "$jobs" ]; do
	KVMLU_FUZZ_JOBS=$jobs KVMLU_FUZZ_EXAMPLES=$per KVMLU_FUZZ_MALFORMED=$per_malformed \
		KVMLU_FUZZ_EDU=$i KVMLU_FUZZ_STATS=$logdir/stats-$i.json \
		"$py" -m pytest -p no:cacheprovider -q --durations=5 \
		tests/kernel/test_fuzz_stateful.py tests/kernel/test_fuzz_malformed.py "$@" \
		> "$logdir/fuzz-$i.log" 2>&1 &
	pids="$pids $!"
	i=$((i + 1))
done

status=0
i=0
for pid in $pids; do
	if wait "$pid"; then
		result=passed
	else
		result=FAILED
		status=1
	fi
	echo "== fuzz process $i: $result"
	cat "$logdir/fuzz-$i.log"
	i=$((i + 1))
done
"$py" -c '
import json, pathlib, sys
docs = [json.loads(p.read_text()) for p in sorted(pathlib.Path(sys.argv[1]).glob("stats-*.json"))]
progs, steps, calls = (sum(d[k] for d in docs) for k in ("programs", "steps", "malformed_calls"))
print(f"fuzz: {progs} programs, {steps} steps, {calls} malformed calls in {sys.argv[2]} s "
      f"({len(docs)} processes reported)")
' "$logdir" "$(( $(date +%s) - start ))" || status=1
echo "fuzz: finished $(date +%T)"
exit $status
