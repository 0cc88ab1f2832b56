# Shared by the recipes' run.sh scripts (sourced, not run). `recipe_setup NAME` moves to the
# repository root and sets `align` (ALIGN, default target/release/align, built if missing),
# `model` (MODEL, default target/smollm2/model, fetched if missing) and `out` (OUT, default
# runs/recipes/NAME, created).

recipe_setup() {
    cd "$(dirname "${BASH_SOURCE[0]}")/.."
    align=${ALIGN:-target/release/align}
    model=${MODEL:-target/smollm2/model}
    out=${OUT:-runs/recipes/$1}
    [ -x "$align" ] || cargo build --release
    [ -f "$model/config.json" ] || scripts/fetch-smollm2.sh "$model"
    mkdir -p "$out"
}

# run_once COMMAND NAME ARG...: `align COMMAND ARG... --out $out/NAME`, resumable: a finished
# run (its final adapter/ or model/ exists) is kept, an interrupted one resumes from its last
# checkpoint.
run_once() {
    local cmd=$1 name=$2
    shift 2
    if [ -d "$out/$name/adapter" ] || [ -d "$out/$name/model" ]; then
        echo "$name: done already"
    elif ls -d "$out/$name"/checkpoint-* >/dev/null 2>&1; then
        "$align" "$cmd" --resume "$out/$name"
    else
        "$align" "$cmd" "$@" --out "$out/$name" --overwrite
    fi
}

# compare_once DST ARG...: `align compare ARG... --out DST`, skipped when DST/report.json
# exists (delete DST to redo it).
compare_once() {
    local dst=$1
    shift
    if [ -f "$dst/report.json" ]; then
        echo "$dst: done already (delete it to redo)"
        return
    fi
    "$align" compare "$@" --out "$dst"
}

# hh_split: recipe 01's split of the HH-RLHF harmless pairs into $out/data (1,400 train / 600
# held-out rows, fixed permutation; the split of docs/dpo.md), once. PYTHON needs pyarrow; HH
# names the parquet (default ../shared/data/hh-rlhf-harmless.parquet).
hh_split() {
    py=${PYTHON:-python3}
    mkdir -p "$out/data"
    [ -f "$out/data/prefs-eval.parquet" ] ||
        "$py" scripts/make_default_data.py "${HH:-../shared/data/hh-rlhf-harmless.parquet}" \
            "$out/data" hh 1400 600
}
