# Sourced by experiments/*/sweep.sh (not run on its own).
# study_sweep NAME OVERRIDES...: one `python -m llmk_lab -m` command with the study's fixed overrides (the
# array BUDGET, set by the script) and OVERRIDES; its jobs land in $SWEEP/NAME_<job number>, so the jobs of
# all the study's commands share one sweep directory and one report. Rerunning skips finished jobs (the same
# config in the same job directory: sweep.resume=true), so an interrupted study continues where it stopped.
study_sweep() {
    local name=$1
    shift
    python -m llmk_lab -m "${BUDGET[@]}" "hydra.sweep.dir=$SWEEP" \
        "hydra.sweep.subdir=${name}_\${hydra.job.num}" sweep.resume=true "$@"
}
