#!/usr/bin/env bash
# Download the public data and weights into the places data/README.md documents.
#   bash data/download.bash                 everything (about 45 GB of downloads)
#   bash data/download.bash vqa_v2 lxmert   only some parts: vqa_v2 vqa_cp_v2 vqa_vs features lxmert hub
# Re-running resumes partial downloads and skips finished files. Then run the prepare commands of
# data/README.md. Not run by the tests. PYTHON (default: python) must have huggingface_hub for "hub".
set -euo pipefail

DATA="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
RAW="$DATA/raw"
LXMERT_DATA="https://nlp.cs.unc.edu/data/lxmert_data"
LXMERT_REPO="https://raw.githubusercontent.com/airsplay/lxmert/master"
VQA_S3="https://s3.amazonaws.com/cvmlp/vqa/mscoco/vqa"
VQACP="https://computing.ece.vt.edu/~aish/vqacp"

# fetch URL FOLDER: download into FOLDER, resuming, unless the file is already complete there.
fetch() {
    local url="$1" dest="$2" name
    name="$(basename "$url")"
    mkdir -p "$dest"
    if [[ -f "$dest/$name" && ! -f "$dest/$name.part" ]]; then
        echo "have $dest/$name"
        return
    fi
    echo "get  $url"
    touch "$dest/$name.part"
    if command -v wget >/dev/null; then
        wget -c -q --show-progress -O "$dest/$name" "$url"
    else
        curl -fL -C - -o "$dest/$name" "$url"
    fi
    rm -f "$dest/$name.part"
}

# fetch_zip URL FOLDER: download a zip, extract its files flat into FOLDER, delete the zip.
fetch_zip() {
    local url="$1" dest="$2" name
    name="$(basename "$url")"
    if [[ -f "$dest/.$name.done" ]]; then
        echo "have $dest/$name (extracted)"
        return
    fi
    fetch "$url" "$dest"
    unzip -o -j "$dest/$name" -d "$dest"
    rm -f "$dest/$name"
    touch "$dest/.$name.done"
}

get_vqa_v2() {
    for part in Questions_Train Questions_Val Questions_Test Annotations_Train Annotations_Val; do
        fetch_zip "$VQA_S3/v2_${part}_mscoco.zip" "$RAW/vqa_v2"
    done
    for split in train nominival minival test; do
        fetch "$LXMERT_DATA/vqa/$split.json" "$DATA/vqa_v2"
    done
    fetch "$LXMERT_REPO/data/vqa/trainval_ans2label.json" "$DATA/vqa_v2"
    fetch "$LXMERT_REPO/data/vqa/trainval_label2ans.json" "$DATA/vqa_v2"
}

get_vqa_cp_v2() {
    for split in train test; do
        for kind in questions annotations; do
            fetch "$VQACP/vqacp_v2_${split}_${kind}.json" "$RAW/vqa_cp_v2"
        done
    done
}

# VQA-VS is used as published: its zips stay as they are in data/raw/vqa_vs (Training/Training-Ques.json.zip,
# Training/Training-Ans.json.zip, Val.zip, IID-Test.zip, OOD-Test.zip); python -m lxmert prepare vqavs reads the
# JSON files straight from them (or from extracted copies). A part that is missing or not a real zip (a Git LFS
# pointer) stops with its name and where else to get it.
VQAVS_PARTS=(Training/Training-Ques.json.zip Training/Training-Ans.json.zip Val.zip IID-Test.zip OOD-Test.zip)
get_vqa_vs() {
    local repo="$RAW/vqa_vs/.release" part missing=0
    if [[ ! -d "$repo" ]]; then
        git clone -q --depth 1 "${VQAVS_REPO:-https://github.com/PhoebusSi/VQA-VS}" "$repo"
    fi
    mkdir -p "$RAW/vqa_vs/Training"
    for part in "${VQAVS_PARTS[@]}"; do
        if [[ -f "$repo/data/$part" && ! -f "$RAW/vqa_vs/$part" ]]; then
            cp "$repo/data/$part" "$RAW/vqa_vs/$part"
        fi
        if [[ ! -f "$RAW/vqa_vs/$part" ]] || ! "${PYTHON:-python3}" -c \
                'import sys, zipfile; sys.exit(zipfile.ZipFile(sys.argv[1]).testzip() is not None)' \
                "$RAW/vqa_vs/$part" 2>/dev/null; then
            echo "VQA-VS: $RAW/vqa_vs/$part is missing or not a zip archive: get it from the data/ folder of" \
                 "https://github.com/PhoebusSi/VQA-VS or its Google Drive folder" \
                 "https://drive.google.com/drive/folders/1i6xqke5X5GoQ8YGoNcs3rtMsDtgs4OLG and put it there as it is" >&2
            missing=1
        fi
    done
    if [[ $missing -ne 0 ]]; then
        return 1
    fi
    echo "have the VQA-VS release in $RAW/vqa_vs (prepare it with python -m lxmert prepare vqavs, data/README.md)"
}

get_features() {
    for split in train2014 val2014 test2015; do
        fetch_zip "$LXMERT_DATA/mscoco_imgfeat/${split}_obj36.zip" "$RAW/mscoco_imgfeat"
    done
}

get_lxmert() {
    fetch "http://nlp.cs.unc.edu/data/model_LXRT.pth" "$DATA/lxmert"
    fetch "$LXMERT_REPO/data/lxmert/all_ans.json" "$DATA/lxmert"
}

get_hub() {
    local model
    for model in unc-nlp/lxmert-base-uncased uclanlp/visualbert-vqa-coco-pre bert-base-uncased; do
        "${PYTHON:-python}" - "$model" "$DATA/models/$(basename "$model")" <<'PY'
import sys
from huggingface_hub import snapshot_download

snapshot_download(repo_id=sys.argv[1], local_dir=sys.argv[2])
print("have", sys.argv[2])
PY
    done
}

parts=("$@")
if [[ ${#parts[@]} -eq 0 ]]; then
    parts=(vqa_v2 vqa_cp_v2 vqa_vs features lxmert hub)
fi
status=0
for part in "${parts[@]}"; do
    case "$part" in
        vqa_v2 | vqa_cp_v2 | vqa_vs | features | lxmert | hub) "get_$part" || status=1 ;;
        *) echo "unknown part '$part' (vqa_v2 vqa_cp_v2 vqa_vs features lxmert hub)" >&2; exit 2 ;;
    esac
done
exit $status
