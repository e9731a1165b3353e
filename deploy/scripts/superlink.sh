#!/usr/bin/env bash
# Coordinating site: start the SuperLink with TLS and SuperNode authentication.
# Flower 1.42 serves the Fleet, Control and Runtime APIs on ONE HTTPS port (default 8000); the ServerApp
# runs in a subprocess of the SuperLink (isolation "subprocess"), so this host needs the project installed.
#   CERTS_DIR  folder from `promptsam deploy certs` (ca.crt, server.pem, server.key)   [./certs]
#   HOST PORT  where to listen                                                          [0.0.0.0 8000]
#   DATABASE   SQLite file keeping registered SuperNodes and runs across restarts       [./superlink-state/state.db]
#   DRY_RUN=1  print the command instead of running it
set -euo pipefail
CERTS_DIR=${CERTS_DIR:-./certs}
HOST=${HOST:-0.0.0.0}
PORT=${PORT:-8000}
DATABASE=${DATABASE:-./superlink-state/state.db}
export FLWR_TELEMETRY_ENABLED=${FLWR_TELEMETRY_ENABLED:-0}

cmd=(flower-superlink
     --ssl-ca-certfile "$CERTS_DIR/ca.crt"
     --ssl-certfile "$CERTS_DIR/server.pem"
     --ssl-keyfile "$CERTS_DIR/server.key"
     --enable-supernode-auth
     --disable-runtime-dependency-installation
     --isolation subprocess
     --host "$HOST" --port "$PORT"
     --database "$DATABASE")

if [[ "${DRY_RUN:-0}" == 1 ]]; then printf '%q ' "${cmd[@]}"; echo; exit 0; fi
for f in ca.crt server.pem server.key; do
  [[ -r "$CERTS_DIR/$f" ]] || {
    echo "error: $CERTS_DIR/$f missing (promptsam deploy certs --out $CERTS_DIR ...)" >&2; exit 2; }
done
mkdir -p "$(dirname "$DATABASE")"
exec "${cmd[@]}"
