#!/usr/bin/env bash
# Download the public data and weights into the places data/README.md documents.
#   bash data/download.bash                 everything (about 45 GB of downloads)
#   bash data/download.bash vqa_v2 lxmert   only some parts: vqa_v2 vqa_cp_v2 vqa_vs features lxmert hub
#
# Every file is downloaded to FILE.part (an interrupted download resumes there: curl -C - / wget -c),
# checked against the table at the end of this script (size and sha256: the publisher's where one is
# published; otherwise the sha256 of the first complete download, recorded in data/raw/downloads.sha256,
# that every later copy must match), and only then renamed to its final name. A zip is extracted after it
# is verified, and its done marker is written only when every member was extracted. A failure prints one
# line "error: URL -> FILE: reason" (and a "hint:" line naming a mirror and the variable to set), leaves
# nothing under the final name, and the script exits 1 after the remaining parts. A rerun skips verified
# files (by size; DOWNLOAD_RECHECK=1 re-hashes them) and resumes partial ones. Needs bash, coreutils, curl
# or wget, unzip (zip parts), git (vqa_vs), and PYTHON with huggingface_hub (hub). Then run the prepare
# commands of data/README.md. data/README.md lists the hosts and their mirrors.
#
# Environment (all optional):
#   DATA_DIR          the data folder (default: the folder of this script)
#   VQA_URL           VQA v2 zips               (default https://s3.amazonaws.com/cvmlp/vqa/mscoco/vqa)
#   LXMERT_DATA_URL   nlp.cs.unc.edu            (default https://nlp.cs.unc.edu/data)
#   LXMERT_REPO_URL   airsplay/lxmert files     (default raw.githubusercontent.com, pinned commit)
#   VQACP_URL         VQA-CP v2 JSON files      (default https://computing.ece.vt.edu/~aish/vqacp)
#   VQAVS_REPO        VQA-VS git repository     (default https://github.com/PhoebusSi/VQA-VS)
#   HF_ENDPOINT       Hugging Face hub          (huggingface_hub's own variable; default https://huggingface.co)
#   DOWNLOAD_TABLE    a file that replaces the built-in table of sizes and checksums (same format)
#   DOWNLOADER        curl or wget              (default: curl when installed)
#   DOWNLOAD_RETRIES  retries of a failed transfer (default 3)
#   DOWNLOAD_RECHECK  1: re-hash files verified by an earlier run instead of comparing their size
#   PYTHON            the Python that has huggingface_hub, for "hub" (default python)
set -euo pipefail

ALL_PARTS=(vqa_v2 vqa_cp_v2 vqa_vs features lxmert hub)
LXMERT_COMMIT=0db1182b9030da3ce41f17717cc628e1cd0a95d5   # airsplay/lxmert master, 2020-12-04

VQA_URL="${VQA_URL:-https://s3.amazonaws.com/cvmlp/vqa/mscoco/vqa}"
LXMERT_DATA_URL="${LXMERT_DATA_URL:-https://nlp.cs.unc.edu/data}"
LXMERT_REPO_URL="${LXMERT_REPO_URL:-https://raw.githubusercontent.com/airsplay/lxmert/$LXMERT_COMMIT}"
VQACP_URL="${VQACP_URL:-https://computing.ece.vt.edu/~aish/vqacp}"
VQAVS_REPO="${VQAVS_REPO:-https://github.com/PhoebusSi/VQA-VS}"
VQA_URL="${VQA_URL%/}" LXMERT_DATA_URL="${LXMERT_DATA_URL%/}" LXMERT_REPO_URL="${LXMERT_REPO_URL%/}"
VQACP_URL="${VQACP_URL%/}"
RETRIES="${DOWNLOAD_RETRIES:-3}"

VQAVS_DRIVE="https://drive.google.com/drive/folders/1i6xqke5X5GoQ8YGoNcs3rtMsDtgs4OLG"
LXMERT_DRIVE="https://drive.google.com/drive/folders/1Gq1uLUk6NdD0CcJOptXjxE6ssY5XAuat"
LXMERT_BAIDU="https://pan.baidu.com/s/1m0mUVsq30rO6F1slxPZNHA (access code wwma)"

CUR_URL="" CUR_FILE=""   # what the current step downloads, for the error lines

say() { printf '%s\n' "$*"; }

# fail URL FILE REASON [HINT]: the one error line (and a hint line), then stop this part.
fail() {
    printf 'error: %s -> %s: %s\n' "$1" "$2" "$3" >&2
    if [[ -n "${4:-}" ]]; then
        printf 'hint: %s\n' "$4" >&2
    fi
    exit 1
}

# unexpected STATUS LINE COMMAND: ERR trap, for any failure not handled by name below.
unexpected() {
    printf 'error: %s -> %s: unexpected failure (status %s) of "%s" at data/download.bash line %s\n' \
        "${CUR_URL:-?}" "${CUR_FILE:-?}" "$1" "$3" "$2" >&2
}

usage_error() {
    printf 'error: %s\n' "$1" >&2
    exit 2
}

# hint_for URL FILE: the mirror to try when URL failed (one line), or nothing.
hint_for() {
    local url="$1" file="$2"
    case "$url" in
        "$VQA_URL"/*)
            say "the VQA v2 zips are also served under https://vision.ece.vt.edu/vqa/release_data/mscoco/vqa" \
                "(hengyuan-hu/bottom-up-attention-vqa#46): set VQA_URL=https://vision.ece.vt.edu/vqa/release_data/mscoco/vqa and rerun" ;;
        "$LXMERT_DATA_URL"/*)
            say "nlp.cs.unc.edu has outages (airsplay/lxmert#108); LXMERT's mirrors are the Google Drive folder" \
                "$LXMERT_DRIVE and Baidu $LXMERT_BAIDU (airsplay/lxmert README): put the file at $file by hand," \
                "or set LXMERT_DATA_URL to a server with the same layout, and rerun" ;;
        "$LXMERT_REPO_URL"/*)
            say "the file is in git: git clone https://github.com/airsplay/lxmert, check out $LXMERT_COMMIT and" \
                "copy ${url#"$LXMERT_REPO_URL"/} to $file, or set LXMERT_REPO_URL to another raw-file host of that commit, and rerun" ;;
        "$VQACP_URL"/*)
            say "computing.ece.vt.edu/~aish/vqacp is reported down (facebookresearch/mmf#1329, GeraldHan/GGE#13);" \
                "the VQA-CP page moved to https://www.iro.umontreal.ca/~agrawal/vqa-cp/ (AishwaryaAgrawal/GVQA README):" \
                "set VQACP_URL to the folder that serves vqacp_v2_*.json there, or put the file at $file by hand, and rerun" ;;
    esac
}

# ---------------------------------------------------------------------------------------------------------
# The table of expected sizes and checksums, and the record of verified downloads.

table_text() {
    if [[ -n "${DOWNLOAD_TABLE:-}" ]]; then
        cat -- "$DOWNLOAD_TABLE"
    else
        builtin_table
    fi
}

# table_entry REL: sets EXP_SIZE, EXP_SHA ("-" where none is published) and EXP_SRC for the file DATA/REL.
table_entry() {
    local path size sha src found=0
    EXP_SIZE="" EXP_SHA="" EXP_SRC=""
    while read -r path size sha src; do
        if [[ -z "$path" || "$path" == \#* ]]; then
            continue
        fi
        if [[ "$path" == "$1" ]]; then
            EXP_SIZE="${size:--}" EXP_SHA="${sha:--}" EXP_SRC="${src:--}"
            found=1
            break
        fi
    done < <(table_text)
    if [[ $found -eq 0 ]]; then
        fail "$CUR_URL" "$CUR_FILE" "no entry '$1' in the table of sizes and checksums (${DOWNLOAD_TABLE:-built-in})"
    fi
}

# record_get REL: sets REC_SHA and REC_SIZE from the record (empty when REL is not recorded).
record_get() {
    local sha size path rest
    REC_SHA="" REC_SIZE=""
    if [[ ! -f "$RECORD" ]]; then
        return 0
    fi
    while read -r sha size path rest; do
        if [[ "$path" == "$1" && "$sha" != \#* ]]; then
            REC_SHA="$sha" REC_SIZE="$size"
        fi
    done <"$RECORD"
}

# record_put REL SHA SIZE SOURCE: (re)writes the line of REL in the record, by rename.
record_put() {
    local new="$RECORD.tmp.$$" sha size path rest
    mkdir -p -- "$(dirname -- "$RECORD")" || fail "$CUR_URL" "$RECORD" "cannot create its folder"
    {
        printf '# sha256 bytes path source: files verified by data/download.bash (paths under the data folder)\n'
        if [[ -f "$RECORD" ]]; then
            while read -r sha size path rest; do
                if [[ "$sha" != \#* && -n "$sha" && "$path" != "$1" ]]; then
                    printf '%s %s %s %s\n' "$sha" "$size" "$path" "$rest"
                fi
            done <"$RECORD"
        fi
        printf '%s %s %s %s\n' "$2" "$3" "$1" "$4"
    } >"$new" || fail "$CUR_URL" "$RECORD" "cannot write $new"
    mv -f -- "$new" "$RECORD" || fail "$CUR_URL" "$RECORD" "cannot rename $new"
}

# measure FILE: sets GOT_SIZE and GOT_SHA.
measure() {
    GOT_SIZE="$(stat -c %s -- "$1")" || fail "$CUR_URL" "$CUR_FILE" "cannot read the size of $1"
    GOT_SHA="$(sha256sum -- "$1")" || fail "$CUR_URL" "$CUR_FILE" "sha256sum of $1 failed"
    GOT_SHA="${GOT_SHA%% *}"
    GOT_SHA="${GOT_SHA#\\}"
}

# content_problem FILE: sets CONTENT_PROBLEM when FILE is plainly not a complete file of its kind (a check for
# files without a published checksum: catches an error page, an empty file, a cut-off JSON or zip).
content_problem() {
    local f="$1" first last
    CONTENT_PROBLEM=""
    if [[ ! -s "$f" ]]; then
        CONTENT_PROBLEM="the file is empty"
        return 0
    fi
    case "$f" in
        *.json | *.json.part)
            first="$(head -c 512 -- "$f" | tr -d ' \t\r\n' | head -c 1 || true)"
            last="$(tail -c 512 -- "$f" | tr -d ' \t\r\n' | tail -c 1 || true)"
            if [[ "$first" != [\[\{] || "$last" != [\]\}] ]]; then
                CONTENT_PROBLEM="not a complete JSON document (starts with '$first', ends with '$last')"
            fi ;;
        *.zip | *.zip.part)
            if ! unzip -l -- "$f" >/dev/null 2>&1; then
                CONTENT_PROBLEM="not a complete zip archive (unzip -l fails)"
            fi ;;
    esac
}

# judge REL FILE: checks FILE against the table entry (table_entry first) or the record; sets PROBLEM (empty
# when it passes), HOW (what it was checked against) and GOT_SIZE / GOT_SHA.
judge() {
    local rel="$1" f="$2"
    PROBLEM="" HOW=""
    measure "$f"
    if [[ "$EXP_SIZE" != "-" && "$GOT_SIZE" != "$EXP_SIZE" ]]; then
        PROBLEM="size mismatch: $GOT_SIZE bytes, expected $EXP_SIZE ($EXP_SRC)"
        return 0
    fi
    if [[ "$EXP_SHA" != "-" ]]; then
        if [[ "$GOT_SHA" != "$EXP_SHA" ]]; then
            PROBLEM="sha256 mismatch: $GOT_SHA, expected $EXP_SHA ($EXP_SRC)"
        else
            HOW="sha256 matches $EXP_SRC"
        fi
        return 0
    fi
    record_get "$rel"
    if [[ -n "$REC_SHA" ]]; then
        if [[ "$GOT_SHA" != "$REC_SHA" || "$GOT_SIZE" != "$REC_SIZE" ]]; then
            PROBLEM="sha256 mismatch: $GOT_SHA ($GOT_SIZE bytes), but the first download recorded $REC_SHA ($REC_SIZE bytes) in $RECORD (no published checksum; if the host really changed the file, delete that line and rerun)"
        else
            HOW="sha256 matches the first download, recorded in $RECORD"
        fi
        return 0
    fi
    content_problem "$f"
    if [[ -n "$CONTENT_PROBLEM" ]]; then
        PROBLEM="$CONTENT_PROBLEM"
    else
        HOW="no published checksum: sha256 recorded in $RECORD, later copies must match it"
    fi
}

# ---------------------------------------------------------------------------------------------------------
# Downloads.

# transfer URL TMP: downloads URL into TMP, resuming TMP if it holds a part; sets TRANSFER_RC and REASON.
transfer() {
    local url="$1" tmp="$2" log="$2.log" code=""
    TRANSFER_RC=0 REASON=""
    if ! command -v "$DOWNLOADER" >/dev/null; then
        TRANSFER_RC=127 REASON="$DOWNLOADER is not installed (install curl or wget, or set DOWNLOADER)"
        return 0
    fi
    case "$DOWNLOADER" in
        curl)
            local args=(-fL -C - --retry "$RETRIES" --connect-timeout 30 --speed-limit 1024 --speed-time 120
                        -o "$tmp")
            if [[ -t 2 ]]; then
                code="$(curl --progress-bar -w '%{http_code}' "${args[@]}" -- "$url")" || TRANSFER_RC=$?
            else
                code="$(curl -sS -w '%{http_code}' "${args[@]}" -- "$url" 2>"$log")" || TRANSFER_RC=$?
            fi
            if [[ $TRANSFER_RC -eq 22 && "$code" == 416 && -s "$tmp" ]]; then
                TRANSFER_RC=0   # nothing left to fetch: the part is complete (or too long; the check decides)
            fi ;;
        wget)
            local args=(-c --tries="$((RETRIES + 1))" --timeout=120 -O "$tmp")
            if [[ -t 2 ]]; then
                wget -q --show-progress "${args[@]}" -- "$url" || TRANSFER_RC=$?
            else
                wget -nv "${args[@]}" -- "$url" 2>"$log" || TRANSFER_RC=$?
            fi ;;
    esac
    if [[ $TRANSFER_RC -ne 0 && -s "$log" ]]; then
        REASON="$(grep -v '^[[:space:]]*$' -- "$log" | tail -n 1 | sed 's/^[0-9-]\{10\} [0-9:]\{8\} //' || true)"
    fi
    rm -f -- "$log"
    if [[ -z "$REASON" && "$DOWNLOADER" == wget ]]; then
        case $TRANSFER_RC in
            3) REASON="wget: file I/O error" ;;
            4) REASON="wget: network failure (connection refused, reset or cut short)" ;;
            5) REASON="wget: TLS verification failure" ;;
            6) REASON="wget: authentication failure" ;;
            8) REASON="wget: the server answered with an error" ;;
        esac
    fi
    if [[ -z "$REASON" ]]; then
        REASON="$DOWNLOADER exit status $TRANSFER_RC"
    fi
}

# fetch URL REL: the file DATA/REL, downloaded from URL and verified, unless an earlier run verified it.
fetch() {
    local url="$1" rel="$2"
    local file="$DATA/$rel" tmp="$DATA/$rel.part" have
    CUR_URL="$url" CUR_FILE="$file"
    table_entry "$rel"
    if [[ -e "$file" ]]; then
        record_get "$rel"
        if [[ -n "$REC_SHA" && "${DOWNLOAD_RECHECK:-0}" != 1 && ( "$EXP_SHA" == "-" || "$EXP_SHA" == "$REC_SHA" ) ]]; then
            have="$(stat -c %s -- "$file")" || fail "$url" "$file" "cannot read its size"
            if [[ "$have" == "$REC_SIZE" ]]; then
                say "have $file"
                return 0
            fi
        fi
        # Not verified by an earlier run (put there by hand, or left by an older version of this script).
        judge "$rel" "$file"
        if [[ -z "$PROBLEM" ]]; then
            record_put "$rel" "$GOT_SHA" "$GOT_SIZE" "$EXP_SRC"
            say "have $file (checked now: $HOW)"
            return 0
        fi
        if [[ ( "$EXP_SIZE" != "-" && "$GOT_SIZE" -lt "$EXP_SIZE" ) || ( "$EXP_SHA" == "-" && -z "$REC_SHA" ) ]]; then
            # Shorter than published, or a cut-off / empty file never verified: an unfinished download.
            mv -f -- "$file" "$tmp" || fail "$url" "$file" "cannot rename it to $tmp"
            say "$file is not complete ($PROBLEM): resuming it as $tmp"
        else
            fail "$url" "$file" "the file there fails the check ($PROBLEM); delete it and rerun"
        fi
    fi
    mkdir -p -- "$(dirname -- "$file")" || fail "$url" "$file" "cannot create its folder"
    if [[ -s "$tmp" ]]; then
        say "resume $url ($(stat -c %s -- "$tmp") bytes in $tmp)"
    else
        say "get  $url"
    fi
    transfer "$url" "$tmp"
    if [[ "$DOWNLOADER" == curl && $TRANSFER_RC -eq 33 ]]; then
        say "the server cannot resume $url: starting over"
        rm -f -- "$tmp"
        transfer "$url" "$tmp"
    fi
    if [[ $TRANSFER_RC -ne 0 ]]; then
        local kept=""
        if [[ -s "$tmp" ]]; then
            kept="; the partial download is kept in $tmp, rerun to resume it"
        else
            rm -f -- "$tmp"
        fi
        fail "$url" "$file" "download failed ($REASON), nothing published$kept" "$(hint_for "$url" "$file")"
    fi
    judge "$rel" "$tmp"
    if [[ -n "$PROBLEM" ]]; then
        rm -f -- "$tmp"
        fail "$url" "$file" "$PROBLEM; nothing published, the download was deleted" "$(hint_for "$url" "$file")"
    fi
    mv -f -- "$tmp" "$file" || fail "$url" "$file" "cannot rename $tmp to it"
    record_put "$rel" "$GOT_SHA" "$GOT_SIZE" "$EXP_SRC"
    say "ok   $file ($GOT_SIZE bytes; $HOW)"
}

# fetch_zip URL REL: downloads and verifies the zip DATA/REL, extracts its files flat next to it, deletes it and
# writes the done marker .NAME.done, in that order; a failed step leaves no marker.
fetch_zip() {
    local url="$1" rel="$2"
    local zip="$DATA/$rel" dest name marker work f
    dest="$(dirname -- "$zip")" name="$(basename -- "$zip")"
    marker="$dest/.$name.done" work="$dest/.$name.extract"
    if [[ -f "$marker" ]]; then
        say "have $zip (extracted)"
        return 0
    fi
    fetch "$url" "$rel"
    CUR_URL="$url" CUR_FILE="$zip"
    command -v unzip >/dev/null || fail "$url" "$zip" "unzip is not installed"
    rm -rf -- "$work"
    mkdir -p -- "$work" || fail "$url" "$zip" "cannot create $work"
    local log="$work.log"
    if ! unzip -q -o -j -- "$zip" -d "$work" >"$log" 2>&1; then
        local why
        why="$(grep -v '^[[:space:]]*$' -- "$log" | tail -n 1 || true)"
        rm -rf -- "$work" "$log"
        fail "$url" "$zip" "unzip failed (${why:-no message}); nothing extracted, no done marker (the zip is kept)"
    fi
    rm -f -- "$log"
    for f in "$work"/* "$work"/.[!.]*; do
        if [[ -e "$f" ]]; then
            mv -f -- "$f" "$dest/" || fail "$url" "$zip" "cannot move $f to $dest"
        fi
    done
    rmdir -- "$work" || fail "$url" "$zip" "cannot remove $work"
    touch -- "$marker" || fail "$url" "$zip" "cannot write the done marker $marker"
    rm -f -- "$zip"
    say "extracted $zip into $dest"
}

# ---------------------------------------------------------------------------------------------------------
# The parts.

get_vqa_v2() {
    local part split
    for part in Questions_Train Questions_Val Questions_Test Annotations_Train Annotations_Val; do
        fetch_zip "$VQA_URL/v2_${part}_mscoco.zip" "raw/vqa_v2/v2_${part}_mscoco.zip"
    done
    for split in train nominival minival test; do
        fetch "$LXMERT_DATA_URL/lxmert_data/vqa/$split.json" "vqa_v2/$split.json"
    done
    fetch "$LXMERT_REPO_URL/data/vqa/trainval_ans2label.json" "vqa_v2/trainval_ans2label.json"
    fetch "$LXMERT_REPO_URL/data/vqa/trainval_label2ans.json" "vqa_v2/trainval_label2ans.json"
}

get_vqa_cp_v2() {
    local split kind
    for split in train test; do
        for kind in questions annotations; do
            fetch "$VQACP_URL/vqacp_v2_${split}_${kind}.json" "raw/vqa_cp_v2/vqacp_v2_${split}_${kind}.json"
        done
    done
}

# VQA-VS is used as published: its zips stay as they are in data/raw/vqa_vs (Training/Training-Ques.json.zip,
# Training/Training-Ans.json.zip, Val.zip, IID-Test.zip, OOD-Test.zip); python -m lxmert prepare vqavs reads the
# JSON files straight from them (or from extracted copies). The release is a git repository: git checks every
# object's hash when it clones, and each copy made here must have the git blob id that the cloned commit lists
# for it. Each part that is missing or not a zip archive (a Git LFS pointer) gets its own error line.
VQAVS_PARTS=(Training/Training-Ques.json.zip Training/Training-Ans.json.zip Val.zip IID-Test.zip OOD-Test.zip)
vqavs_missing() {  # vqavs_missing PART: the error line of a part that is missing or not a zip
    printf 'error: %s -> %s: %s is missing or not a zip archive: get it from the data/ folder of %s or its Google Drive folder %s and put it there as it is\n' \
        "$VQAVS_REPO (data/$1)" "$RAW/vqa_vs/$1" "$RAW/vqa_vs/$1" "https://github.com/PhoebusSi/VQA-VS" "$VQAVS_DRIVE" >&2
}
get_vqa_vs() {
    local clone="$RAW/vqa_vs/.release" part dest src blob got commit bad=0 log
    CUR_URL="$VQAVS_REPO" CUR_FILE="$clone"
    command -v git >/dev/null || fail "$VQAVS_REPO" "$clone" "git is not installed"
    mkdir -p -- "$RAW/vqa_vs/Training" || fail "$VQAVS_REPO" "$RAW/vqa_vs" "cannot create the folder"
    if [[ ! -d "$clone/.git" ]]; then
        rm -rf -- "$clone.tmp"
        log="$RAW/vqa_vs/.clone.log"
        say "get  $VQAVS_REPO (git clone)"
        if ! git clone -q --depth 1 -- "$VQAVS_REPO" "$clone.tmp" >"$log" 2>&1; then
            local why
            why="$(grep -v '^[[:space:]]*$' -- "$log" | tail -n 1 || true)"
            rm -rf -- "$clone.tmp" "$log"
            fail "$VQAVS_REPO" "$clone" "git clone failed (${why:-no message}), nothing published" \
                "the VQA-VS release is also in its Google Drive folder $VQAVS_DRIVE (PhoebusSi/VQA-VS README): put the zips in $RAW/vqa_vs as published, or set VQAVS_REPO to a copy of the repository, and rerun"
        fi
        rm -f -- "$log"
        mv -- "$clone.tmp" "$clone" || fail "$VQAVS_REPO" "$clone" "cannot rename $clone.tmp"
    fi
    commit="$(git -C "$clone" rev-parse HEAD)" || fail "$VQAVS_REPO" "$clone" "not a git repository"
    for part in "${VQAVS_PARTS[@]}"; do
        dest="$RAW/vqa_vs/$part" src="$clone/data/$part"
        CUR_URL="$VQAVS_REPO (data/$part)" CUR_FILE="$dest"
        blob="$(git -C "$clone" rev-parse -q --verify "HEAD:data/$part" 2>/dev/null || true)"
        if [[ ! -e "$dest" ]]; then
            if [[ ! -f "$src" ]] || ! unzip -tqq -- "$src" >/dev/null 2>&1; then
                vqavs_missing "$part"
                bad=1
                continue
            fi
            cp -- "$src" "$dest.part" || fail "$CUR_URL" "$dest" "cannot copy $src"
            got="$(git hash-object -- "$dest.part")" || fail "$CUR_URL" "$dest" "git hash-object failed"
            if [[ -n "$blob" && "$got" != "$blob" ]]; then
                rm -f -- "$dest.part"
                printf 'error: %s -> %s: the copy has git blob id %s, but commit %s lists %s; nothing published\n' \
                    "$CUR_URL" "$dest" "$got" "$commit" "$blob" >&2
                bad=1
                continue
            fi
            measure "$dest.part"
            mv -f -- "$dest.part" "$dest" || fail "$CUR_URL" "$dest" "cannot rename $dest.part"
            record_put "raw/vqa_vs/$part" "$GOT_SHA" "$GOT_SIZE" "git-blob:$blob@$VQAVS_REPO@$commit"
            say "ok   $dest (git blob $got of $VQAVS_REPO at $commit)"
            continue
        fi
        record_get "raw/vqa_vs/$part"
        if [[ -n "$REC_SHA" && "${DOWNLOAD_RECHECK:-0}" != 1 && "$(stat -c %s -- "$dest")" == "$REC_SIZE" ]]; then
            say "have $dest"
            continue
        fi
        if ! unzip -tqq -- "$dest" >/dev/null 2>&1; then
            vqavs_missing "$part"
            bad=1
            continue
        fi
        measure "$dest"
        if [[ -n "$REC_SHA" && "$GOT_SHA" != "$REC_SHA" ]]; then
            printf 'error: %s -> %s: sha256 %s differs from %s, recorded when it was copied (%s); delete it and rerun\n' \
                "$CUR_URL" "$dest" "$GOT_SHA" "$REC_SHA" "$RECORD" >&2
            bad=1
            continue
        fi
        got="$(git hash-object -- "$dest")" || fail "$CUR_URL" "$dest" "git hash-object failed"
        if [[ -n "$blob" && "$got" != "$blob" ]]; then
            say "note: $dest is a valid zip but not the bytes of data/$part at $commit (git blob $blob); kept as provided"
        fi
        record_put "raw/vqa_vs/$part" "$GOT_SHA" "$GOT_SIZE" "provided:git-blob:$got"
        say "have $dest (a valid zip archive, recorded in $RECORD)"
    done
    if [[ $bad -ne 0 ]]; then
        exit 1
    fi
    say "have the VQA-VS release in $RAW/vqa_vs (prepare it with python -m lxmert prepare vqavs, data/README.md)"
}

get_features() {
    local split
    for split in train2014 val2014 test2015; do
        fetch_zip "$LXMERT_DATA_URL/lxmert_data/mscoco_imgfeat/${split}_obj36.zip" "raw/mscoco_imgfeat/${split}_obj36.zip"
    done
}

get_lxmert() {
    fetch "$LXMERT_DATA_URL/model_LXRT.pth" "lxmert/model_LXRT.pth"
    fetch "$LXMERT_REPO_URL/data/lxmert/all_ans.json" "lxmert/all_ans.json"
}

# The hub models, PyTorch weights only (safetensors, else pytorch_model*.bin; no TF / Flax / ONNX copies) plus
# config and tokenizer files, each checked against the size and sha256 (LFS files) or git blob id (small files)
# that the hub lists for the downloaded commit.
get_hub() {
    local model py="${PYTHON:-python}"
    CUR_URL="${HF_ENDPOINT:-https://huggingface.co}" CUR_FILE="$DATA/models"
    command -v "$py" >/dev/null || fail "$CUR_URL" "$CUR_FILE" "PYTHON=$py is not installed"
    for model in unc-nlp/lxmert-base-uncased uclanlp/visualbert-vqa-coco-pre bert-base-uncased; do
        CUR_URL="${HF_ENDPOINT:-https://huggingface.co}/$model" CUR_FILE="$DATA/models/$(basename -- "$model")"
        if ! "$py" - "$model" "$CUR_FILE" <<'PY'; then
import hashlib, os, re, sys
from pathlib import Path

repo, out = sys.argv[1], Path(sys.argv[2])
url = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/") + "/" + repo
HINT = ("hint: huggingface.co unreachable? the community mirror https://hf-mirror.com serves the same API "
        "(huggingface/huggingface_hub#2830): set HF_ENDPOINT=https://hf-mirror.com and rerun")


def fail(message, hint=False):
    print(f"error: {url} -> {out}: {message}", file=sys.stderr)
    if hint:
        print(HINT, file=sys.stderr)
    sys.exit(1)


def first_line(exc):
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


try:
    from huggingface_hub import HfApi, snapshot_download
except ImportError as exc:
    fail(f"huggingface_hub is not installed for {sys.executable} ({first_line(exc)}); set PYTHON")
try:
    info = HfApi().model_info(repo, files_metadata=True)
except Exception as exc:  # noqa: BLE001 - any failure of the hub is reported as one line
    fail(f"cannot list the repository's files ({first_line(exc)})", hint=True)
files = {s.rfilename: s for s in info.siblings}
top = sorted(name for name in files if "/" not in name)
weights = [n for n in top if n.endswith(".safetensors")]
index = "model.safetensors.index.json"
if not weights:
    weights = [n for n in top if re.fullmatch(r"pytorch_model(-\d+-of-\d+)?\.bin", n)]
    index = "pytorch_model.bin.index.json"
extra = {"config.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json",
         "added_tokens.json", "vocab.json", "merges.txt", index}
wanted = sorted(set(weights) | {n for n in top if n in extra})
if not weights or "config.json" not in wanted:
    fail(f"no config.json or no PyTorch weights (safetensors / pytorch_model.bin) among {top}")
try:
    snapshot_download(repo_id=repo, revision=info.sha, local_dir=str(out), allow_patterns=wanted)
except Exception as exc:  # noqa: BLE001
    fail(f"snapshot_download failed ({first_line(exc)})", hint=True)
for name in wanted:
    sibling, path = files[name], out / name
    lfs = sibling.lfs
    if lfs is not None:
        size = lfs["size"] if isinstance(lfs, dict) else lfs.size
        expected = lfs["sha256"] if isinstance(lfs, dict) else lfs.sha256
    else:
        size, expected = sibling.size, sibling.blob_id
    if not path.is_file():
        fail(f"{name} was not downloaded")
    data_size = path.stat().st_size
    digest = hashlib.sha256() if lfs is not None else hashlib.sha1(b"blob %d\0" % data_size)
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    got = digest.hexdigest()
    kind = "sha256" if lfs is not None else "git blob id"
    if (size is not None and data_size != size) or (expected and got != expected):
        path.unlink()
        fail(f"{name}: {data_size} bytes, {kind} {got}; the hub lists {size} bytes, {expected} at "
             f"{info.sha} (deleted; rerun to download it again)", hint=True)
print(f"have {out} ({repo} at {info.sha}: {', '.join(wanted)}; sizes and sha256 / git blob ids match the hub's)")
PY
            exit 1
        fi
    done
}

# ---------------------------------------------------------------------------------------------------------

# path (under the data folder)  bytes  sha256  source of the checksum ("-": none published; the first complete
# download is recorded in data/raw/downloads.sha256 and later copies must match it). The three airsplay/lxmert
# files are pinned to commit LXMERT_COMMIT: sizes and sha256 computed from its git blobs (ids in data/README.md).
builtin_table() {
    cat <<'TABLE'
raw/vqa_v2/v2_Questions_Train_mscoco.zip     -       -  none-published
raw/vqa_v2/v2_Questions_Val_mscoco.zip       -       -  none-published
raw/vqa_v2/v2_Questions_Test_mscoco.zip      -       -  none-published
raw/vqa_v2/v2_Annotations_Train_mscoco.zip   -       -  none-published
raw/vqa_v2/v2_Annotations_Val_mscoco.zip     -       -  none-published
vqa_v2/train.json                            -       -  none-published
vqa_v2/nominival.json                        -       -  none-published
vqa_v2/minival.json                          -       -  none-published
vqa_v2/test.json                             -       -  none-published
vqa_v2/trainval_ans2label.json   64332  ab3b0707b4c78ff28587f0131cee4d63b0e0c0d22ad82a89e809521abdc412dc  airsplay/lxmert@0db1182:data/vqa/trainval_ans2label.json
vqa_v2/trainval_label2ans.json   46668  e72e568a6303130f5a627db06360605ee3b306366ff463aa5153d782adc12a7d  airsplay/lxmert@0db1182:data/vqa/trainval_label2ans.json
raw/vqa_cp_v2/vqacp_v2_train_questions.json    -  -  none-published
raw/vqa_cp_v2/vqacp_v2_train_annotations.json  -  -  none-published
raw/vqa_cp_v2/vqacp_v2_test_questions.json     -  -  none-published
raw/vqa_cp_v2/vqacp_v2_test_annotations.json   -  -  none-published
raw/mscoco_imgfeat/train2014_obj36.zip       -       -  none-published
raw/mscoco_imgfeat/val2014_obj36.zip         -       -  none-published
raw/mscoco_imgfeat/test2015_obj36.zip        -       -  none-published
lxmert/model_LXRT.pth                        -       -  none-published
lxmert/all_ans.json              986576 b860c6cd7b8fe3afa1e5308933664c37bc8728eff967e9845543169a06d012b8  airsplay/lxmert@0db1182:data/lxmert/all_ans.json
TABLE
}

main() {
    local part rc status=0 failed=()
    local parts=("$@")
    if [[ ${#parts[@]} -eq 1 && ( "${parts[0]}" == -h || "${parts[0]}" == --help ) ]]; then
        sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'
        exit 0
    fi
    if [[ ${#parts[@]} -eq 0 ]]; then
        parts=("${ALL_PARTS[@]}")
    fi
    for part in "${parts[@]}"; do
        case "$part" in
            vqa_v2 | vqa_cp_v2 | vqa_vs | features | lxmert | hub) ;;
            *) usage_error "unknown part '$part' (parts: ${ALL_PARTS[*]})" ;;
        esac
    done
    if [[ -n "${DOWNLOAD_TABLE:-}" && ! -r "$DOWNLOAD_TABLE" ]]; then
        usage_error "DOWNLOAD_TABLE=$DOWNLOAD_TABLE is not a readable file"
    fi
    DOWNLOADER="${DOWNLOADER:-}"
    if [[ -z "$DOWNLOADER" ]]; then
        if command -v curl >/dev/null; then DOWNLOADER=curl; elif command -v wget >/dev/null; then DOWNLOADER=wget; fi
    fi
    case "$DOWNLOADER" in
        curl | wget | "") ;;
        *) usage_error "DOWNLOADER=$DOWNLOADER: use curl or wget" ;;
    esac
    DOWNLOADER="${DOWNLOADER:-curl}"   # when neither is installed, each download says so (its URL and file)
    if [[ -n "${DATA_DIR:-}" ]]; then
        mkdir -p -- "$DATA_DIR" || usage_error "cannot create DATA_DIR=$DATA_DIR"
        DATA="$(cd -- "$DATA_DIR" && pwd)"
    else
        DATA="$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)"
    fi
    RAW="$DATA/raw"
    RECORD="$RAW/downloads.sha256"
    for part in "${parts[@]}"; do
        set +e
        (
            set -eE
            trap 'unexpected $? $LINENO "$BASH_COMMAND"' ERR
            "get_$part"
        )
        rc=$?
        set -e
        if [[ $rc -ne 0 ]]; then
            status=1
            failed+=("$part")
        fi
    done
    if [[ $status -ne 0 ]]; then
        say "download.bash: failed: ${failed[*]} (the error lines above name each URL and file); rerun to resume" >&2
    fi
    exit $status
}

main "$@"
