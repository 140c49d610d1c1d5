#!/bin/sh
# The image's command: `python train.py "$@"`, every argument a Hydra override.
#
# Exit codes are train.py's (README, "Exit codes"): 0 complete, 2 bad config, 3 unusable
# checkpoint, 4 checkpoint write failed, 75 interrupted after an emergency checkpoint (retry).
# SPOT_EXIT_PREEMPTED_AS=N reports 75 as N instead, for an orchestrator that retries only some
# codes: Kubeflow's restartPolicy ExitCode restarts a pod for 128-255 and treats 1-127 as
# permanent (docker/k8s/pytorchjob.yaml sets 203 = 128 + 75).
set -u
app=$(cd "$(dirname "$0")/.." && pwd)

if [ -z "${SPOT_EXIT_PREEMPTED_AS:-}" ]; then
    exec python "$app/train.py" "$@"
fi

# This shell stays to translate the code, so it must outlive the signals that tini (-g) sends
# to the whole process group: trapped, they wait until train.py has saved and exited.
# (Trapped rather than ignored: an ignored signal would stay ignored in train.py.)
trap : TERM INT HUP USR1 USR2
python "$app/train.py" "$@"
code=$?
if [ "$code" -eq 75 ]; then
    exit "$SPOT_EXIT_PREEMPTED_AS"
fi
exit "$code"
