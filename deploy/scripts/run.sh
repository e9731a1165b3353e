#!/usr/bin/env bash
# Data scientist / coordinating site: check the run config, submit a federated training run, follow its log.
#   CONNECTION   flwr CLI connection (see register.sh / `promptsam deploy connect`)   [promptsam]
#   APP_DIR      the project folder (pyproject.toml with [tool.flwr.app])             [repository root]
#   RUN_CONFIG   overrides, e.g. 'num-server-rounds=20 run-dir="/srv/runs/exp1"'      []
#   DRY_RUN=1    check the config and print the command instead of running it
# Unknown keys and values of the wrong type are reported by name before anything is submitted.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CONNECTION=${CONNECTION:-promptsam}
APP_DIR=${APP_DIR:-$here/../..}
cmd=(promptsam deploy run --app "$APP_DIR" --connection "$CONNECTION")
[[ -n "${RUN_CONFIG:-}" ]] && cmd+=(--run-config "$RUN_CONFIG")
if [[ "${DRY_RUN:-0}" == 1 ]]; then exec "${cmd[@]}"; fi
exec "${cmd[@]}" --exec
