#!/usr/bin/env bash
# Coordinating site: register every hospital's public key (KEYS_DIR/*.pub) with the SuperLink.
# Only registered SuperNodes may connect (the SuperLink runs with --enable-supernode-auth).
# Waits for the SuperLink (up to WAIT_S seconds); keys that are already registered are skipped.
#   SUPERLINK_ADDRESS  host:port of the SuperLink                                       [127.0.0.1:8000]
#   CA_CERT            the federation's CA certificate                                  [./certs/ca.crt]
#   KEYS_DIR           folder with <hospital>.pub files                                 [./certs/hospitals]
#   CONNECTION         name of the flwr CLI connection written to $FLWR_HOME/config.toml [promptsam]
#   DRY_RUN=1          print the commands instead of running them
set -euo pipefail
SUPERLINK_ADDRESS=${SUPERLINK_ADDRESS:-127.0.0.1:8000}
CA_CERT=${CA_CERT:-./certs/ca.crt}
KEYS_DIR=${KEYS_DIR:-./certs/hospitals}
CONNECTION=${CONNECTION:-promptsam}
WAIT_S=${WAIT_S:-120}
export FLWR_TELEMETRY_ENABLED=${FLWR_TELEMETRY_ENABLED:-0}

shopt -s nullglob
keys=("$KEYS_DIR"/*.pub)
(( ${#keys[@]} )) || { echo "error: no *.pub files in $KEYS_DIR" >&2; exit 2; }
connect=(promptsam deploy connect --name "$CONNECTION" --address "$SUPERLINK_ADDRESS" --ca "$CA_CERT")
if [[ "${DRY_RUN:-0}" == 1 ]]; then
  printf '%q ' "${connect[@]}"; echo
  for k in "${keys[@]}"; do printf '%q ' flwr supernode register "$k" "$CONNECTION"; echo; done
  exit 0
fi
"${connect[@]}"

deadline=$((SECONDS + WAIT_S))
until flwr supernode list "$CONNECTION" >/dev/null 2>&1; do
  (( SECONDS < deadline )) || { echo "error: SuperLink $SUPERLINK_ADDRESS not reachable after ${WAIT_S}s" >&2; exit 1; }
  sleep 3
done
for k in "${keys[@]}"; do
  if out=$(flwr supernode register "$k" "$CONNECTION" 2>&1); then
    echo "registered $(basename "$k" .pub): ${out##*SuperNode }"
  elif grep -qi "already" <<<"$out"; then
    echo "already registered: $(basename "$k" .pub)"
  else
    echo "error: registering $k failed:" >&2; echo "$out" >&2; exit 1
  fi
done
flwr supernode list "$CONNECTION"
