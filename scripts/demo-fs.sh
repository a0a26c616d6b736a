#!/usr/bin/env bash
# Demo of the replicated filesystem on this machine: a secondary and a primary over
# loopback, a qcow2 image written through the mount with O_DIRECT (as QEMU's
# cache='none' does), both copies compared, then the secondary killed: the next write
# fails with EIO after the lock timeout instead of being acknowledged unreplicated.
set -euo pipefail
BIN=${VMHA_FS_BIN:-$(dirname "$0")/../target/release/vmha-fs}
DIR=$(mktemp -d /var/tmp/vmha-demo.XXXXXX)
PORT=${PORT:-17101}
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
    sleep 1
    for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done
    umount -l "$DIR/pri/mnt" 2>/dev/null || true
    umount -l "$DIR/sec/data" 2>/dev/null || true
    rm -rf "$DIR"
}
trap cleanup EXIT
mkdir -p "$DIR"/{pri/data,pri/mnt,pri/state,sec/data,sec/state}
"$BIN" keygen "$DIR/cluster.key"

wait_ready() { # file
    for _ in $(seq 100); do grep -q ready "$1" && return 0; sleep 0.1; done
    cat "$1"; echo "not ready" >&2; return 1
}
"$BIN" secondary --backing "$DIR/sec/data" --listen "127.0.0.1:$PORT" \
    --state "$DIR/sec/state" --key-file "$DIR/cluster.key" 2>"$DIR/sec.log" &
pids+=($!); sec=$!; disown
wait_ready "$DIR/sec.log"
"$BIN" primary --backing "$DIR/pri/data" --mount "$DIR/pri/mnt" --peer "127.0.0.1:$PORT" \
    --state "$DIR/pri/state" --key-file "$DIR/cluster.key" --lock-timeout-ms 2000 2>"$DIR/pri.log" &
pids+=($!); disown
wait_ready "$DIR/pri.log"
echo "== pair up: $DIR/pri/mnt replicates to $DIR/sec/data"

qemu-img create -q -f qcow2 "$DIR/pri/mnt/vm1.qcow2" 1G
qemu-io -f qcow2 -t none -c 'write -P 0x5a 0 64M' -c 'write -P 0xa5 512M 16M' \
    -c 'discard 0 1M' -c flush "$DIR/pri/mnt/vm1.qcow2" | grep -E "wrote|discard"
echo "== sha256 of both copies:"
sha256sum "$DIR/pri/data/vm1.qcow2" "$DIR/sec/data/vm1.qcow2"
cmp "$DIR/pri/data/vm1.qcow2" "$DIR/sec/data/vm1.qcow2" && echo "identical"
echo "== a local write on the secondary is refused:"
touch "$DIR/sec/data/stray" 2>&1 || true

echo "== killing the secondary (SIGKILL), then writing through the mount:"
kill -9 "$sec"
start=$(date +%s.%N)
if dd if=/dev/zero of="$DIR/pri/mnt/vm1.qcow2" bs=4k count=1 seek=10 conv=notrunc,fsync oflag=direct 2>"$DIR/dd.err"; then
    echo "UNEXPECTED: write acknowledged without the peer" >&2; exit 1
fi
end=$(date +%s.%N)
printf "write failed after %.1f s (lock timeout 2 s): %s\n" "$(echo "$end - $start" | bc)" "$(grep -m1 -i error "$DIR/dd.err")"
echo "== primary log:"; tail -3 "$DIR/pri.log"
