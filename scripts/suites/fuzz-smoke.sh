#!/usr/bin/env bash
# Extra suite for scripts/test-all.sh: the fuzzing smoke pass.
exec bash "$(dirname "$0")/../fuzz-smoke.sh"
