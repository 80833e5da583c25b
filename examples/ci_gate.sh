#!/usr/bin/env bash
# A CI gate: build the bundle and fail the pipeline when a budget fails (exit code 3), with the misses in the log.
#
#   examples/ci_gate.sh ./my-model --target raspberry-pi-5 --out build/ci-bundle
#
# In GitHub Actions:
#   - run: pip install edgecompress
#   - run: examples/ci_gate.sh ./my-model --target raspberry-pi-5 --out build/ci-bundle
#   - uses: actions/upload-artifact@v4          # the report explains a failure: keep it
#     if: always()
#     with: { name: bundle, path: build/ci-bundle }
#
# Exit codes (edgecompress build): 0 within every budget, 3 built but a budget failed, 2 usage error, 1 other
# error, 130 interrupted. This script passes them through, so the job fails on anything but 0.
set -uo pipefail
EDGECOMPRESS=${EDGECOMPRESS:-edgecompress}   # e.g. "python -m edgecompress.cli" inside a checkout

summary=$(mktemp)
trap 'rm -f "$summary"' EXIT
$EDGECOMPRESS build "$@" --force --json > "$summary"
code=$?
case $code in
  0) echo "ci-gate: within every budget" ;;
  3) echo "ci-gate: FAILED: a budget was missed; the bundle and its report.html are still written:" >&2
     python3 -c 'import json, sys; [print("  -", f, file=sys.stderr) for f in json.load(open(sys.argv[1]))["failed"]]' \
       "$summary" ;;
  *) echo "ci-gate: the build did not complete (exit $code)" >&2 ;;
esac
exit $code
