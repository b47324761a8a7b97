#!/usr/bin/env bash
# The job of a bundle: installs (as the test command does), then runs the bundle end to end on the embedded
# synthetic data: teacher training (train.json + train_teacher.json), GroupDistil student training (train.json),
# evaluation on the test split (train.json + evaluate.json), each its own `python -m monai.bundle run`.
# Usage: bash scripts/main_job.sh [BUNDLE] [WORK_DIR]
#   BUNDLE: a folder name under bundles/ (default: cardiac_mri_groupdistil, the main job;
#           cardiac_mri_seg_groupdistil: the segmentation job; waterbirds_groupdistil)
#   WORK_DIR: data, checkpoints, reports and logs (default: runs/BUNDLE)
# A first argument that names no bundle is the WORK_DIR of the main job (bash scripts/main_job.sh /tmp/mainjob).
set -euo pipefail
cd "$(dirname "$0")/.."
# One intra-op thread per process unless told otherwise: the batches are small, and on a 2-core machine shared
# with other work two threads per process made an epoch about 10x slower (measured: ~24 s against ~2 s).
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
NAME=cardiac_mri_groupdistil
if [[ $# -gt 0 && -d "bundles/$1" ]]; then
    NAME=$1
    shift
fi
BUNDLE=bundles/$NAME
WORK=${1:-runs/$NAME}
bash scripts/setup_env.sh
mkdir -p "$WORK"
PYTHON=$PWD/.venv/bin/python
WORK_DIR=$(cd "$WORK" && pwd)
COMMON=(--meta_file configs/metadata.json --logging_file configs/logging.conf --dataset_dir "$WORK_DIR/data"
        --ckpt_dir "$WORK_DIR/models" --output_dir "$WORK_DIR/eval" --log_dir "$WORK_DIR/logs" --progress_bar False)
# from the bundle folder, as in the model zoo: the configs import the bundle's scripts/ from there
run() { (cd "$BUNDLE" && "$PYTHON" -m monai.bundle run --config_file "$1" "${COMMON[@]}"); }
start=$(date +%s)
run "['configs/train.json','configs/train_teacher.json']"
run "configs/train.json"
run "['configs/train.json','configs/evaluate.json']"
echo
echo "$NAME job finished in $(( $(date +%s) - start )) s (after installation)"
echo "per-group report: $WORK/eval/groupdistil/group_report.csv and metrics.json; plots: $WORK/eval/groupdistil/*.png"
cat "$WORK/eval/groupdistil/group_report.csv"
