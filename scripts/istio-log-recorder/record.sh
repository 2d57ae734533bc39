#!/bin/sh
# Records Istio's plugin log request into node-agent/tests/data/istio-plugin-log-request.http (see main.go).
set -eu
here=$(cd "$(dirname "$0")" && pwd)
out="$here/../../node-agent/tests/data/istio-plugin-log-request.http"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
mkdir -p "$(dirname "$out")"
python3 - "$tmp/log.sock" "$out" <<'PY' &
import socket, sys
s = socket.socket(socket.AF_UNIX); s.bind(sys.argv[1]); s.listen(1)
c, _ = s.accept(); data = b""
while b"\r\n\r\n" not in data: data += c.recv(65536)
head, body = data.split(b"\r\n\r\n", 1)
n = int([l.split(b":")[1] for l in head.split(b"\r\n") if l.lower().startswith(b"content-length:")][0])
while len(body) < n: body += c.recv(65536)
open(sys.argv[2], "wb").write(head + b"\r\n\r\n" + body)
c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"); c.close()
PY
while [ ! -S "$tmp/log.sock" ]; do sleep 0.05; done
GO111MODULE=off GOPATH=/usr/share/gocode GOCACHE="$tmp/cache" go run "$here/main.go" "$tmp/log.sock"
wait
