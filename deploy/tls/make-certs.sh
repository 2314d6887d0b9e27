#!/usr/bin/env bash
# A private CA and a server certificate for the compose deployment's gRPC TLS:
#   bash deploy/tls/make-certs.sh [HOSTNAME|IP ...]
# writes ca.crt/ca.key and server.crt/server.key into $TLS_DIR (default: this directory). The
# server certificate names `triton` (the Locust callers reach it so), localhost, 127.0.0.1 and
# every HOSTNAME or IP given: the names callers use. Give callers ca.crt (--tls-ca); keep ca.key
# off the server. Existing files are kept: delete them to make new ones. Bring your own
# certificates instead by putting server.crt, server.key (and ca.crt for Locust) in $TLS_DIR.
set -euo pipefail
dir=${TLS_DIR:-$(cd "$(dirname "$0")" && pwd)}
days=${DAYS:-825}
mkdir -p "$dir"
cd "$dir"
if [ -e server.crt ] || [ -e server.key ]; then
    echo "$dir already holds server.crt/server.key: delete them to make new ones" >&2
    exit 1
fi
names="DNS:triton,DNS:localhost,IP:127.0.0.1"
for name in "$@"; do
    if [[ $name =~ ^[0-9.]+$ || $name == *:* ]]; then names+=",IP:$name"; else names+=",DNS:$name"; fi
done
umask 077  # the keys are readable by their owner only
if [ ! -e ca.crt ]; then
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout ca.key -out ca.crt \
        -days "$days" -subj "/CN=tritonasr CA" -addext "basicConstraints=critical,CA:TRUE" \
        -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
fi
openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout server.key -out server.csr \
    -subj "/CN=tritonasr" 2>/dev/null
openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -out server.crt -days "$days" \
    -extfile <(printf 'subjectAltName=%s\nextendedKeyUsage=serverAuth\nbasicConstraints=CA:FALSE\n' "$names") \
    2>/dev/null
rm -f server.csr ca.srl
chmod 644 ca.crt server.crt
echo "wrote $dir/ca.crt and $dir/server.{crt,key} for $names"
