#!/usr/bin/env bash
# Stop the head started by cluster/local-head.sh, and only it.
#
#   cluster/stop.sh [--temp-dir DIR] [--grace SECONDS]   (DIR: the --temp-dir given to local-head.sh)
#
# `ray stop` would end every Ray process of this user on the machine (other clusters, test
# sessions, notebooks). Instead this finds the processes whose command line names this head's
# temp dir (GCS, raylet, dashboard, agents, workers), adds their descendants (job drivers),
# sends SIGTERM, and SIGKILL to whatever is left after a grace period.
set -euo pipefail

temp_dir="${TMPDIR:-/tmp}/segray-ray"
grace=10

while [[ $# -gt 0 ]]; do
    case "$1" in
        --temp-dir) temp_dir="$2"; shift 2 ;;
        --grace) grace="$2"; shift 2 ;;
        -h|--help) sed -n '2,4p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "stop.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
    esac
done
temp_dir="${temp_dir%/}"

regex_quote() { printf '%s' "$1" | sed 's/[][\.*^$+?(){}|]/\\&/g'; }

# Ray's processes carry the temp dir as --temp-dir=DIR / --temp_dir=DIR or inside session paths
# (DIR/session_...); the Ray Client server names only the GCS address, which the head records
# in DIR/ray_current_cluster. Match those forms only, with the paths taken literally.
pattern="(--temp[-_]dir=$(regex_quote "$temp_dir")( |$)|$(regex_quote "$temp_dir")/session_)"
if [[ -s "$temp_dir/ray_current_cluster" ]]; then
    gcs_address=$(head -n1 "$temp_dir/ray_current_cluster")
    pattern="${pattern%)}|--(gcs[-_])?address=$(regex_quote "$gcs_address")( |$))"
fi

descendants() {
    local pid child
    for pid in "$@"; do
        for child in $(pgrep -P "$pid" || true); do
            echo "$child"
            descendants "$child"
        done
    done
}

roots=$(pgrep -f -- "$pattern" || true)
if [[ -z "$roots" ]]; then
    echo "stop.sh: no Ray processes use ${temp_dir}; nothing to stop"
    exit 0
fi
# shellcheck disable=SC2086
pids=$(printf '%s\n' $roots $(descendants $roots) | grep -vx "$$" | sort -u)
echo "stop.sh: stopping $(echo "$pids" | wc -w) processes of the head in ${temp_dir}"

# TERM, then wait up to $grace seconds; prints the pids still alive.
terminate() {
    [[ $# -eq 0 ]] && return 0
    kill -TERM "$@" 2>/dev/null || true
    local alive
    for _ in $(seq $((grace * 2))); do
        alive=$(ps -o pid= -p "$(IFS=,; echo "$*")" 2>/dev/null || true)
        [[ -z "$alive" ]] && return 0
        sleep 0.5
    done
    echo $alive
}

# The GCS goes last: a raylet or agent whose GCS is already gone hangs in its shutdown
# instead of exiting (measured: all in ~4 s this way, against SIGKILL after the grace
# period when everything gets SIGTERM at once).
gcs=$(pgrep -f -- "gcs_server .*$(regex_quote "$temp_dir")/session_" || true)
# shellcheck disable=SC2086
others=$(printf '%s\n' $pids | grep -vxF "${gcs:-none}" || true)
# shellcheck disable=SC2086
left=$(terminate $others; terminate $gcs)

rm -f "$temp_dir/ray_current_cluster"  # so that a later head on this address is not taken for ours
if [[ -z "$left" ]]; then
    echo "stop.sh: stopped"
    exit 0
fi
# shellcheck disable=SC2086
names=$(ps -o comm= -p "$(echo $left | tr ' ' ',')" 2>/dev/null | sort | uniq -c | awk '{print $2 "(" $1 ")"}' | paste -sd' ' -)
# shellcheck disable=SC2086
kill -KILL $left 2>/dev/null || true
echo "stop.sh: stopped; SIGKILL for what outlived ${grace}s of SIGTERM: ${names}"
