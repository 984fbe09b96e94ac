#!/usr/bin/env bash
# Start a single-node Ray head on 127.0.0.1 with token authentication on, and print how to
# submit the segray jobs to it. Stop it with cluster/stop.sh (same --temp-dir).
#
#   cluster/local-head.sh [--port 6379] [--dashboard-port 8265] [--temp-dir DIR] [--num-cpus N]
#                         [-- EXTRA ARGS FOR ray start]
#
# The token: RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH if you set one, otherwise ~/.ray/auth_token,
# generated on first use by `ray get-auth-token --generate`. It is never printed here.
#
# S3 settings: every job driver and worker of this head inherits the environment of the shell
# that runs this script, so export AWS_ENDPOINT_URL / AWS_REGION / credentials here (or let an
# instance role provide them) and no credential has to travel in a job's runtime_env.
set -euo pipefail

port=6379
dashboard_port=8265
temp_dir="${TMPDIR:-/tmp}/segray-ray"
num_cpus=""
extra=()

usage() { sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'; }

while [[ $# -gt 0 ]]; do
    case "$1" in
        --port) port="$2"; shift 2 ;;
        --dashboard-port) dashboard_port="$2"; shift 2 ;;
        --temp-dir) temp_dir="$2"; shift 2 ;;
        --num-cpus) num_cpus="$2"; shift 2 ;;
        -h|--help) usage; exit 0 ;;
        --) shift; extra=("$@"); break ;;
        *) echo "local-head.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
    esac
done

command -v ray >/dev/null || { echo "local-head.sh: 'ray' not found; pip install -e '.[test]' first" >&2; exit 1; }

# Token auth stays on: refuse an environment that turns it off instead of silently obeying it.
if [[ -n "${RAY_AUTH_MODE:-}" && "${RAY_AUTH_MODE}" != "token" ]]; then
    echo "local-head.sh: RAY_AUTH_MODE=${RAY_AUTH_MODE}; this head runs with token authentication only (unset it)" >&2
    exit 1
fi
export RAY_AUTH_MODE=token

# `ray start` (unlike ray.init) does not create a token; make sure one exists. Ray looks in
# RAY_AUTH_TOKEN, then RAY_AUTH_TOKEN_PATH, then ~/.ray/auth_token; --generate writes the last.
if [[ -z "${RAY_AUTH_TOKEN:-}" && -z "${RAY_AUTH_TOKEN_PATH:-}" && ! -s "$HOME/.ray/auth_token" ]]; then
    ray get-auth-token --generate >/dev/null
    chmod 600 "$HOME/.ray/auth_token"
fi
if [[ -n "${RAY_AUTH_TOKEN:-}" ]]; then
    token_source="the RAY_AUTH_TOKEN variable of this shell"
elif [[ -n "${RAY_AUTH_TOKEN_PATH:-}" ]]; then
    token_source="${RAY_AUTH_TOKEN_PATH} (RAY_AUTH_TOKEN_PATH)"
else
    token_source="$HOME/.ray/auth_token"
    if [[ -n "$(find "$HOME/.ray/auth_token" -perm /077 2>/dev/null)" ]]; then
        echo "local-head.sh: warning: $HOME/.ray/auth_token is readable by other users; chmod 600 it" >&2
    fi
fi

# A temp dir of our own keeps this head's sessions and logs apart from any other Ray on the
# machine, and lets stop.sh find exactly this head's processes.
mkdir -p "$temp_dir"
args=(--head --node-ip-address 127.0.0.1 --port "$port"
      --include-dashboard true --dashboard-host 127.0.0.1 --dashboard-port "$dashboard_port"
      --temp-dir "$temp_dir" --disable-usage-stats)
[[ -n "$num_cpus" ]] && args+=(--num-cpus "$num_cpus")
ray start "${args[@]}" ${extra[@]+"${extra[@]}"}

aws_vars=$(env | grep -o '^AWS_[A-Z0-9_]*' | sort | paste -sd' ' - || true)
cat <<EOF

segray: Ray head on 127.0.0.1:${port}, dashboard http://127.0.0.1:${dashboard_port} (token auth on)
  token:       ${token_source}
  AWS_* set:   ${aws_vars:-none} (inherited by every job of this head)
  temp dir:    ${temp_dir}

Submit from the repository root (another shell on this machine; the client sends the token
only when RAY_AUTH_MODE=token is set, and reads it from the same place as the head):

  export RAY_AUTH_MODE=token RAY_ADDRESS=http://127.0.0.1:${dashboard_port}
  ray job submit --working-dir . -- python jobs/prepare.py --source s3://BUCKET/camvid --dest s3://BUCKET/prepared --size 176x240

  # S3 settings not exported to the head (an endpoint, a region) go in the job's runtime_env:
  ray job submit --working-dir . \\
      --runtime-env-json '{"env_vars": {"AWS_ENDPOINT_URL": "http://127.0.0.1:9000", "AWS_REGION": "us-east-1"}}' \\
      -- python jobs/prepare.py --source s3://BUCKET/camvid --dest s3://BUCKET/prepared

Stop it with: cluster/stop.sh --temp-dir ${temp_dir}
EOF
