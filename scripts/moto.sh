# Sourced by the scripts: start_moto starts moto's server on a free loopback port in the background
# and exports AWS_ENDPOINT_URL and test credentials; stop_moto stops it.
free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

start_moto() {
  local log=${1:-/dev/null}
  MOTO_PORT=$(free_port)
  .venv/bin/moto_server -H 127.0.0.1 -p "$MOTO_PORT" >"$log" 2>&1 &
  MOTO_PID=$!
  # The benchmarks read the emulator's CPU time from /proc/$MOTO_PID.
  export MOTO_PID
  for _ in $(seq 1 150); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$MOTO_PORT") 2>/dev/null; then
      export AWS_ENDPOINT_URL="http://127.0.0.1:$MOTO_PORT"
      export AWS_ACCESS_KEY_ID=${AWS_ACCESS_KEY_ID:-test} AWS_SECRET_ACCESS_KEY=${AWS_SECRET_ACCESS_KEY:-test}
      export AWS_REGION=${AWS_REGION:-us-east-1}
      return 0
    fi
    if ! kill -0 "$MOTO_PID" 2>/dev/null; then
      echo "error: the AWS emulator (moto_server) exited at start; see $log" >&2
      return 1
    fi
    sleep 0.1
  done
  echo "error: the AWS emulator (moto_server) did not listen on port $MOTO_PORT within 15 s" >&2
  return 1
}

stop_moto() {
  if [ -n "${MOTO_PID:-}" ]; then kill "$MOTO_PID" 2>/dev/null || true; wait "$MOTO_PID" 2>/dev/null || true; fi
}
