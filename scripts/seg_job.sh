#!/usr/bin/env bash
# The segmentation job: installs (as the test command does), then runs the cardiac segmentation bundle end to end on
# the embedded synthetic data: U-Net teacher training, GroupDistil student training, per-vendor evaluation (Dice,
# HD95) on the test split.
# Usage: bash scripts/seg_job.sh [WORK_DIR]   (default: runs/cardiac_mri_seg_groupdistil)
set -euo pipefail
cd "$(dirname "$0")/.."
# one intra-op thread per process unless told otherwise (small batches on a shared 2-core machine)
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
bash scripts/setup_env.sh
BUNDLE=bundles/cardiac_mri_seg_groupdistil
WORK=${1:-runs/cardiac_mri_seg_groupdistil}
mkdir -p "$WORK"
COMMON=(--meta_file "$BUNDLE/configs/metadata.json" --logging_file "$BUNDLE/configs/logging.conf"
        --bundle_root "$BUNDLE" --dataset_dir "$WORK/data" --ckpt_dir "$WORK/models" --output_dir "$WORK/eval"
        --log_dir "$WORK/logs" --progress_bar False)
run() { .venv/bin/python -m monai.bundle run --config_file "$1" "${COMMON[@]}"; }
start=$(date +%s)
run "['$BUNDLE/configs/train.json','$BUNDLE/configs/train_teacher.json']"
run "$BUNDLE/configs/train.json"
run "['$BUNDLE/configs/train.json','$BUNDLE/configs/evaluate.json']"
echo
echo "segmentation job finished in $(( $(date +%s) - start )) s (after installation)"
echo "per-group report: $WORK/eval/groupdistil/group_report.csv and metrics.json; plots: $WORK/eval/groupdistil/*.png"
cat "$WORK/eval/groupdistil/group_report.csv"
