#!/usr/bin/env bash
# Hospital: start this hospital's SuperNode. Only model updates leave the site; images and masks stay in DATA_DIR.
#   SUPERLINK_ADDRESS  host:port of the coordinating site's SuperLink                   (required)
#   CA_CERT            the federation's CA certificate (ca.crt)                          [./certs/ca.crt]
#   NODE_KEY           this hospital's private key (OpenSSH ECDSA P-384)                 (required)
#   DATA_DIR           folder with images/ and masks/ (same file names)                  (required)
#   RUNTIME_PORT       local port of this SuperNode's Runtime API (one per SuperNode)     [9094]
#   NODE_CONFIG_EXTRA  more node config, e.g. 'val-fraction=0.2 partition-id=3'          []
#   DRY_RUN=1          print the command instead of running it
set -euo pipefail
: "${SUPERLINK_ADDRESS:?set SUPERLINK_ADDRESS=host:port of the SuperLink}"
: "${NODE_KEY:?set NODE_KEY to the private key file of this hospital}"
: "${DATA_DIR:?set DATA_DIR to the folder holding images/ and masks/}"
CA_CERT=${CA_CERT:-./certs/ca.crt}
RUNTIME_PORT=${RUNTIME_PORT:-9094}
export FLWR_TELEMETRY_ENABLED=${FLWR_TELEMETRY_ENABLED:-0}

data_abs=$(cd "$DATA_DIR" 2>/dev/null && pwd) || { echo "error: DATA_DIR $DATA_DIR is not a folder" >&2; exit 2; }
node_config="data-path=\"$data_abs\"${NODE_CONFIG_EXTRA:+ $NODE_CONFIG_EXTRA}"
cmd=(flower-supernode
     --superlink "$SUPERLINK_ADDRESS"
     --root-certificates "$CA_CERT"
     --auth-supernode-private-key "$NODE_KEY"
     --node-config "$node_config"
     --isolation subprocess
     --host 127.0.0.1 --port "$RUNTIME_PORT")

if [[ "${DRY_RUN:-0}" == 1 ]]; then printf '%q ' "${cmd[@]}"; echo; exit 0; fi
for f in "$CA_CERT" "$NODE_KEY"; do [[ -r "$f" ]] || { echo "error: $f missing or unreadable" >&2; exit 2; }; done
[[ -d "$data_abs/images" && -d "$data_abs/masks" ]] || { echo "error: $data_abs needs images/ and masks/" >&2; exit 2; }
exec "${cmd[@]}"
