#!/usr/bin/env bash
# The whole mipseg pipeline on synthetic data, ending in one table of Dice scores.
#
# `make demo` runs it inside the project's virtualenv. Every stage is the real command-line tool; each
# command is printed before it runs, so the same lines work on your own data. Data goes under
# ./mipseg_data unless MIPSEG_RAW / MIPSEG_PREPROCESSED / MIPSEG_RESULTS say otherwise.
#
# Settings (environment variables; defaults = the full demo, about 10 min on 2 CPU cores):
#   DEMO_VESSEL_ID / DEMO_ORGAN_ID   dataset ids (900 / 901)
#   DEMO_CASES / DEMO_TEST_CASES     vessel training / test cases (the folds: min(5, DEMO_CASES))
#   DEMO_SHAPE                       vessel volume size "Z Y X"
#   DEMO_VESSEL_DENSITY / DEMO_NOISE_SCALE   mipseg_synthesize --vessel-density / --noise-scale of the
#                                    vessel dataset (default 2 / 16: crowded, noisy volumes, closer to
#                                    the real microscopy scans than the synthesizer's default 1 / 1)
#   DEMO_EPOCHS / DEMO_ITERS         epochs x iterations per epoch of every training run
#   DEMO_VAL_ITERS                   validation batches per epoch
#   DEMO_FINETUNE_EPOCHS             epochs of the fine-tuning on the refined labels
#   DEMO_DENSE_EPOCHS                epochs of each dense-label fold model (default DEMO_EPOCHS)
#   DEMO_PASSES                      stochastic passes of mipseg_refine
#   DEMO_ORGAN_CASES / DEMO_ORGAN_SHAPE / DEMO_ORGAN_TEST_CASES   the organ dataset
#   DEMO_ORGAN_CLASSES               labelled organs per volume, 1..4 (default 1; 3: the organ and two
#                                    neighbours, with a per-class table; the demo's 60-iteration model
#                                    does not learn the neighbours, see README)
#   DEMO_ORGAN_EPOCHS                epochs of the model trained on propagated labels
#   DEMO_FLOW_ITERS                  training iterations of the propagation flow model
#   DEMO_NP                          worker processes of plan / evaluate
#   DEMO_NUM_WORKERS                 augmentation worker processes of mipseg_train (0)
#   DEMO_REPORT                      where the final table is also written as JSON
#   DEMO_FRESH=1                     start over instead of continuing where an earlier run stopped
#
# Resumable: every finished command is recorded in $MIPSEG_RESULTS/demo_done.txt and skipped when the
# demo is run again with the same settings; the command that was interrupted is re-run with --continue
# (the tools that have it), so Ctrl-C and `make demo` again continue where it stopped.
set -euo pipefail

VESSEL_ID=${DEMO_VESSEL_ID:-900}
ORGAN_ID=${DEMO_ORGAN_ID:-901}
CASES=${DEMO_CASES:-10}
TEST_CASES=${DEMO_TEST_CASES:-10}
read -r -a SHAPE <<<"${DEMO_SHAPE:-32 48 48}"
VESSEL_DENSITY=${DEMO_VESSEL_DENSITY:-2}
NOISE_SCALE=${DEMO_NOISE_SCALE:-16}
EPOCHS=${DEMO_EPOCHS:-4}
ITERS=${DEMO_ITERS:-15}
VAL_ITERS=${DEMO_VAL_ITERS:-1}
FINETUNE_EPOCHS=${DEMO_FINETUNE_EPOCHS:-2}
DENSE_EPOCHS=${DEMO_DENSE_EPOCHS:-$EPOCHS}
PASSES=${DEMO_PASSES:-2}
ORGAN_CASES=${DEMO_ORGAN_CASES:-4}
ORGAN_TEST_CASES=${DEMO_ORGAN_TEST_CASES:-2}
read -r -a ORGAN_SHAPE <<<"${DEMO_ORGAN_SHAPE:-24 48 48}"
ORGAN_CLASSES=${DEMO_ORGAN_CLASSES:-1}
ORGAN_EPOCHS=${DEMO_ORGAN_EPOCHS:-4}
FLOW_ITERS=${DEMO_FLOW_ITERS:-60}
NP=${DEMO_NP:-2}
SCHEDULE=(--epochs "$EPOCHS" --iters-per-epoch "$ITERS" --val-iters "$VAL_ITERS")
# In-process augmentation: on 2 cores, worker processes cost more (each imports torch) than they save.
WORKERS=(--num-workers "${DEMO_NUM_WORKERS:-0}")

RESULTS_ROOT=$(python -c "from mipseg import paths; print(paths.results_root())")
DONE_FILE="$RESULTS_ROOT/demo_done.txt"
mkdir -p "$RESULTS_ROOT"
[[ ${DEMO_FRESH:-0} == 1 ]] && rm -f "$DONE_FILE"
touch "$DONE_FILE"
if [[ -s $DONE_FILE ]]; then
	printf 'continuing the demo: %d finished commands of an earlier run are skipped (DEMO_FRESH=1 starts over)\n' \
		"$(grep -c '^done' "$DONE_FILE")"
fi
printf 'The demo takes about 9-10 min on 2 idle CPU cores (measured from a fresh clone; 2-5x that on a busy\n'
printf 'machine). Ctrl-C stops it; run make demo again to continue where it stopped.\n'
trap 'printf "\ninterrupted; run make demo again to continue where it stopped\n"; exit 130' INT

DEMO_START=$(date +%s.%N)
TIMINGS=$(mktemp)
CPU_SNAPSHOT=$(mktemp)
trap 'rm -f "$TIMINGS" "$CPU_SNAPSHOT"' EXIT
STEP=0

step() { # step TITLE: a numbered heading
	STEP=$((STEP + 1))
	STEP_TITLE="$1"
	printf '\n\033[1m== %d. %s\033[0m\n' "$STEP" "$1"
}

cpu_seconds_of_snapshot() { # user + sys CPU seconds of every finished child, from a `times` snapshot
	awk 'NR == 2 { n = split($0, t, " "); s = 0; for (i = 1; i <= n; i++) { split(t[i], ms, /m|s/); s += ms[1] * 60 + ms[2] } print s }' "$CPU_SNAPSHOT"
}

RESUMABLE=" mipseg_plan mipseg_pseudolabel mipseg_train mipseg_refine mipseg_propagate mipseg_predict "

run() { # run COMMAND...: print it, run it (skip it if done before, --continue it if cut), print its times
	local line="$*"
	if [[ $1 != python ]] && grep -qxF -- "done	$line" "$DONE_FILE"; then # the table: always
		printf '\033[2m$ %s  (done in an earlier run)\033[0m\n' "$line"
		return
	fi
	local args=("$@")
	# an interrupted run of this very command: continue it (--init-from and --continue exclude each other)
	if grep -qxF -- "started	$line" "$DONE_FILE" && [[ $RESUMABLE == *" $1 "* && $line != *--init-from* ]]; then
		args+=(--continue)
	fi
	printf 'started\t%s\n' "$line" >>"$DONE_FILE"
	printf '\033[36m$ %s\033[0m\n' "${args[*]}"
	local start cpu_start end cpu_end
	start=$(date +%s.%N)
	times >"$CPU_SNAPSHOT" # here, not in $(...): a subshell does not see this shell's children
	cpu_start=$(cpu_seconds_of_snapshot)
	"${args[@]}"
	printf 'done\t%s\n' "$line" >>"$DONE_FILE"
	end=$(date +%s.%N)
	times >"$CPU_SNAPSHOT"
	cpu_end=$(cpu_seconds_of_snapshot)
	local wall cpu
	wall=$(awk -v a="$start" -v b="$end" 'BEGIN { printf "%.1f", b - a }')
	cpu=$(awk -v a="$cpu_start" -v b="$cpu_end" 'BEGIN { printf "%.1f", b - a }')
	local total
	total=$(awk -v a="$DEMO_START" -v b="$end" 'BEGIN { printf "%.0f", b - a }')
	printf '\033[2m   %s s wall, %s s CPU (user+sys); %s s since the start\033[0m\n' "$wall" "$cpu" "$total"
	printf '%s\t%s\t%s\t%s\n' "$STEP" "${STEP_TITLE:0:60}" "$wall" "$cpu" >>"$TIMINGS"
}

py() { python -c "$1"; }

# ---------------------------------------------------------------------------------------------- vessels
step "synthesize a vessel dataset with MIP annotations (Dataset${VESSEL_ID})"
run mipseg_synthesize -d "$VESSEL_ID" --kind vessels --cases "$CASES" --test-cases "$TEST_CASES" \
	--shape "${SHAPE[@]}" --vessel-density "$VESSEL_DENSITY" --noise-scale "$NOISE_SCALE" --seed 0 --overwrite
run mipseg_validate -d "$VESSEL_ID" --require-annotations
VESSEL_RAW=$(py "from mipseg import paths; print(paths.raw_dataset_dir($VESSEL_ID))")
VESSEL_RESULTS=$(py "from mipseg import paths; print(paths.results_dataset_dir($VESSEL_ID))")
VESSEL_PRE=$(py "from mipseg import paths; print(paths.preprocessed_dataset_dir($VESSEL_ID))")

step "plan and preprocess"
run mipseg_plan -d "$VESSEL_ID" -np "$NP"
# Refinement needs an out-of-fold model for every case: train every fold of splits.json.
read -r -a FOLDS <<<"$(py "import json; print(*range(len(json.load(open('$VESSEL_PRE/splits.json')))))")"

step "pseudo-labels from the MIP drawings"
run mipseg_pseudolabel -d "$VESSEL_ID" --name pseudo

step "train the ${#FOLDS[@]} folds on the pseudo-labels (dropout for the refinement's stochastic passes)"
for fold in "${FOLDS[@]}"; do
	run mipseg_train -d "$VESSEL_ID" -f "$fold" --labels pseudo --dropout 0.3 "${SCHEDULE[@]}" "${WORKERS[@]}"
done
PSEUDO_MODEL=$(basename "$(ls -d "$VESSEL_RESULTS"/*__pseudo__3d_fullres | head -n 1)")
TRAINER=${PSEUDO_MODEL%%__*}

step "refine the pseudo-labels with the out-of-fold models"
run mipseg_refine -d "$VESSEL_ID" --labels pseudo --name refined --trainer "$TRAINER" --passes "$PASSES"

step "fine-tune every fold on the refined labels"
for fold in "${FOLDS[@]}"; do
	run mipseg_train -d "$VESSEL_ID" -f "$fold" --labels refined --trainer "$TRAINER" \
		--init-from "$VESSEL_RESULTS/$PSEUDO_MODEL/fold_$fold/checkpoint_final.pt" \
		--epochs "$FINETUNE_EPOCHS" --iters-per-epoch "$ITERS" --val-iters "$VAL_ITERS" "${WORKERS[@]}"
done

step "dense-label upper bound: the same folds and schedule on full labels (labelsTr), plain 3D trainer"
for fold in "${FOLDS[@]}"; do
	run mipseg_train -d "$VESSEL_ID" -f "$fold" --labels dense --trainer plain --epochs "$DENSE_EPOCHS" \
		--iters-per-epoch "$ITERS" --val-iters "$VAL_ITERS" "${WORKERS[@]}"
done

step "predict the test images and evaluate against labelsTs"
for labels in pseudo refined dense; do
	trainer=$TRAINER
	[[ $labels == dense ]] && trainer=plain
	run mipseg_predict -i "$VESSEL_RAW/imagesTs" -o "$VESSEL_RESULTS/demo_predictions/$labels" \
		-d "$VESSEL_ID" --labels "$labels" --trainer "$trainer" --disable-tta
	run mipseg_evaluate "$VESSEL_RAW/labelsTs" "$VESSEL_RESULTS/demo_predictions/$labels" \
		-d "$VESSEL_ID" -np "$NP"
done

step "analyse the refined model's predicted vessels: centreline graph, branches, length, radius"
run mipseg_analyze -i "$VESSEL_RESULTS/demo_predictions/refined" -o "$VESSEL_RESULTS/demo_analysis/refined" ||
	echo "   mipseg_analyze reported the case(s) above (exit status 2); the demo goes on"

# ----------------------------------------------------------------------------------------------- organs
step "synthesize $ORGAN_CLASSES touching organs per volume, one annotated slice per case (Dataset${ORGAN_ID})"
run mipseg_synthesize -d "$ORGAN_ID" --kind organs --organ-classes "$ORGAN_CLASSES" --cases "$ORGAN_CASES" \
	--test-cases "$ORGAN_TEST_CASES" --shape "${ORGAN_SHAPE[@]}" --seed 0 --overwrite
ORGAN_RAW=$(py "from mipseg import paths; print(paths.raw_dataset_dir($ORGAN_ID))")
ORGAN_RESULTS=$(py "from mipseg import paths; print(paths.results_dataset_dir($ORGAN_ID))")
run mipseg_plan -d "$ORGAN_ID" -np "$NP"

step "train the self-supervised flow model and suggest the slice to annotate per case"
run mipseg_propagate -d "$ORGAN_ID" --suggest 1 --iters "$FLOW_ITERS"

step "the annotator draws the suggested slices (simulated: the synthetic truth, every class, on those slices)"
run py "from mipseg import paths; from mipseg.synthetic import annotate_suggested_slices as draw; \
print(draw($ORGAN_ID, paths.preprocessed_dataset_dir($ORGAN_ID) / 'suggested_slices.json'))"

step "propagate the annotated slices through the volumes: registration, then flow"
run mipseg_propagate -d "$ORGAN_ID" --method registration --name registration --iters "$FLOW_ITERS"
run mipseg_propagate -d "$ORGAN_ID" --method flow --name propagated --iters "$FLOW_ITERS"

step "train on the flow-propagated labels, predict the test images, evaluate"
run mipseg_train -d "$ORGAN_ID" -f all --labels propagated --epochs "$ORGAN_EPOCHS" --iters-per-epoch "$ITERS" \
	--val-iters "$VAL_ITERS" "${WORKERS[@]}"
run mipseg_predict -i "$ORGAN_RAW/imagesTs" -o "$ORGAN_RESULTS/demo_predictions/propagated" -d "$ORGAN_ID" \
	--labels propagated --disable-tta
run mipseg_evaluate "$ORGAN_RAW/labelsTs" "$ORGAN_RESULTS/demo_predictions/propagated" -d "$ORGAN_ID" -np "$NP"

# ------------------------------------------------------------------------------------------------ table
step "results"
run python -m mipseg.demo_report --vessels "$VESSEL_ID" --organs "$ORGAN_ID" ${DEMO_REPORT:+--json "$DEMO_REPORT"}

printf '\nStep times (wall s, then CPU s = user+sys of its commands):\n'
awk -F'\t' '{ w[$1] += $3; c[$1] += $4; n[$1] = $2 } END { for (s in w) printf "  %2d %-60s %7.1f %7.1f\n", s, n[s], w[s], c[s] }' "$TIMINGS" | sort -n
awk -F'\t' -v a="$DEMO_START" -v b="$(date +%s.%N)" '{ c += $4 } END { printf "  total: %.0f s wall, %.0f s CPU (%.0f s on 2 idle cores at best)\n", b - a, c, c / 2 }' "$TIMINGS"
