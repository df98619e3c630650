#!/usr/bin/env sh
# A development CA and one certificate per llmp component, for mutual TLS on gRPC in docker compose (on
# Kubernetes the mesh does this). Each component presents its certificate as server and as client and trusts
# only this CA, so a caller without one of these certificates is refused before any servicer runs.
#
#   scripts/gen_grpc_certs.sh [OUT_DIR] [COMPONENT...]
#
# OUT_DIR (default deploy/compose/tls) gets ca.pem and <component>/{cert.pem,key.pem,ca.pem}; the CA's key
# stays in OUT_DIR/ca-key.pem (never mounted). Existing files are kept: rerunning adds missing components only.
# A certificate names the component (its compose host name), localhost and 127.0.0.1.
set -eu
out=${1:-deploy/compose/tls}
[ $# -gt 0 ] && shift
components=${*:-gateway dataset training training-worker registry inference}
days=825
umask 077
mkdir -p "$out"
if [ ! -f "$out/ca.pem" ]; then
  openssl req -x509 -newkey rsa:2048 -nodes -days "$days" -subj "/CN=llmp dev gRPC CA" \
    -keyout "$out/ca-key.pem" -out "$out/ca.pem" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
fi
for component in $components; do
  dir="$out/$component"
  [ -f "$dir/cert.pem" ] && continue
  mkdir -p "$dir"
  openssl req -newkey rsa:2048 -nodes -subj "/CN=$component" -keyout "$dir/key.pem" -out "$dir/req.pem" 2>/dev/null
  printf 'subjectAltName=DNS:%s,DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth,clientAuth\nbasicConstraints=CA:FALSE\n' \
    "$component" > "$dir/ext.cnf"
  openssl x509 -req -in "$dir/req.pem" -CA "$out/ca.pem" -CAkey "$out/ca-key.pem" -CAcreateserial \
    -days "$days" -extfile "$dir/ext.cnf" -out "$dir/cert.pem" 2>/dev/null
  cp "$out/ca.pem" "$dir/ca.pem"
  rm -f "$dir/req.pem" "$dir/ext.cnf"
  # The services run as a non-root user in their images: the key must be readable by it through the mount.
  chmod 644 "$dir/key.pem" "$dir/cert.pem" "$dir/ca.pem"
  chmod 755 "$dir"
done
chmod 755 "$out"
echo "gRPC certificates for: $components (in $out)"
