#!/bin/bash
# Loopback check of docs/flower.md, steps 4, 5 and 9 (flwr 1.41): a test CA made with OpenSSL, a
# SuperLink with TLS and --enable-supernode-auth, two SuperNode keys registered with `flwr supernode
# register`, two SuperNodes with --root-certificates / --auth-supernode-private-key / a state-dir,
# a 4-round PF2LoRA run submitted with run_flower_deploy(..., root_certificates=...), and SuperNode 1
# stopped after round 1 and started again with the same key and state dir (it must come back with
# the same node id and the run must finish). Everything binds 127.0.0.1; the work folder is kept.
#   scripts/flower_tls_check.sh [WORKDIR]      (run from the repository root; needs openssl, ssh-keygen)
set -u
ROOT=$(pwd)
B=${VENV_BIN:-$ROOT/.venv/bin}
D=${1:-$(mktemp -d /tmp/pf2lora-tls-check-XXXXXX)}
mkdir -p "$D" && cd "$D" || exit 1
export FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1 FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
export RAY_USAGE_STATS_ENABLED=0 RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 PATH=$B:$PATH FLWR_HOME=$D/home
fp() { "$B/python" -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])'; }

# step 4: test CA + SuperLink certificate (SANs: localhost, 127.0.0.1)
openssl req -x509 -newkey rsa:4096 -nodes -days 365 -keyout ca.key -out ca.crt -subj "/CN=pf2lora test CA" 2>/dev/null
openssl req -newkey rsa:4096 -nodes -keyout server.key -out server.csr -subj "/CN=superlink" 2>/dev/null
printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n' > server.ext
openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 365 -out server.pem -extfile server.ext 2>/dev/null
openssl verify -CAfile ca.crt server.pem || exit 1
# step 5: one ECDSA P-384 key pair per SuperNode
for i in 0 1; do rm -f node$i node$i.pub; ssh-keygen -t ecdsa -b 384 -N "" -f node$i -q; done

PORT=$(fp)
mkdir -p "$FLWR_HOME" logs state/client-0 state/client-1
printf '[superlink]\ndefault = "fed"\n\n[superlink.fed]\naddress = "127.0.0.1:%s"\nroot-certificates = "%s/ca.crt"\n' "$PORT" "$D" > "$FLWR_HOME/config.toml"
flower-superlink --ssl-ca-certfile ca.crt --ssl-certfile server.pem --ssl-keyfile server.key --enable-supernode-auth \
  --host 127.0.0.1 --port "$PORT" --database "$D/superlink.db" > logs/superlink.log 2>&1 &
SL=$!
sleep 8
flwr supernode register node0.pub fed && flwr supernode register node1.pub fed && flwr supernode list fed || { kill $SL; exit 1; }
start_node() {
  flower-supernode --superlink 127.0.0.1:"$PORT" --root-certificates ca.crt --auth-supernode-private-key node$1 --port "$(fp)" \
    --node-config "partition-id=$1 num-partitions=2 state-dir=\"$D/state/client-$1\"" > logs/supernode-$1$2.log 2>&1 &
}
start_node 0 ""; SN0=$!
start_node 1 ""; SN1=$!
sleep 3
(cd "$ROOT" && "$B/python" - "$PORT" "$D" > "$D/logs/submit.log" 2>&1 <<'PY'
import sys
from pf2lora.config import load
from pf2lora.engines.flower.deploy import run_flower_deploy
port, d = sys.argv[1], sys.argv[2]
cfg = load("configs/synthetic_rank.toml", ["rounds=4", "task.num_clients=2", "task.private_ranks=[0, 1]", 'methods=["pf2lora"]', "num_threads=1"])
(r,) = run_flower_deploy(cfg, f"127.0.0.1:{port}", root_certificates=f"{d}/ca.crt", workdir=f"{d}/work", timeout_s=500,
                         on_round=lambda rec: print("ROUND", rec["round"], "participants", rec["participants"], flush=True))
print("RESULT", r.method, len(r.rounds), "rounds; faults:", r.faults, flush=True)
PY
) &
SUB=$!
for _ in $(seq 1 600); do grep -q "^ROUND 1 " logs/submit.log 2>/dev/null && break; sleep 0.5; done
echo "after round 1: stopping SuperNode 1 and starting it again (same key, same state dir)"
kill $SN1; wait $SN1 2>/dev/null
start_node 1 "-restarted"; SN1=$!
wait $SUB; RC=$?
grep -v -i warn logs/submit.log
echo "node ids of SuperNode 1:"; grep -h "SuperNode ID" logs/supernode-1.log logs/supernode-1-restarted.log
kill $SN0 $SN1 $SL 2>/dev/null; wait 2>/dev/null
echo "submit exit $RC; work folder $D"
exit $RC
