#!/usr/bin/env bash
# Demo of vmha: two simulated nodes on this machine (network + mount + PID
# namespaces, each with its own libvirtd), vmhad on both, the tiny counter
# guest as module vm1 on node1, its disk replicated to node2 by vmha-fs.
# Then node1 crashes (SIGKILL of every process of the node: qemu, vmhad,
# vmha-fs, libvirtd) and node2 goes ALONE and boots vm1 from its own copy:
# the counter the guest reads from disk on node2 is >= the last counter
# node1's guest acknowledged (printed only after O_DIRECT + fsync).
#
# The story is the end-to-end test `node1_crash_fails_over_to_node2_without_losing_counters`
# (tests/tests/failover.rs) run with VMHA_DEMO=1, which prints `vmctl status`
# before and after, the counters and the failover timings. At the end it
# prints the web console's URL (node2's console, forwarded from
# https://127.0.0.1:9010/, or another local port if 9010 is taken) with the
# admin password it set, and keeps the cluster up until Enter is pressed;
# when standard input is not a terminal it does not wait. Everything it
# creates (namespaces, daemons, FUSE mounts, the cluster directory under
# /var/tmp) is torn down when it ends, fails, or is interrupted.
#
# Needs root, /dev/fuse and the packages of .ci/install-deps; builds with cargo.
# RUST_LOG=info shows the daemons' logs too.
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "demo.sh: needs root (namespaces, FUSE, libvirtd)" >&2; exit 1; }

export VMHA_DEMO=1
export RUST_LOG=${RUST_LOG:-warn}
TEST=node1_crash_fails_over_to_node2_without_losing_counters

# Namespaces left by a test process that died without its teardown (e.g.
# interrupted): the netns is named vmha-t<creator pid>-<seq>-<node>. Only
# those whose creator is gone are removed; their processes are killed by PID.
cleanup_stale() {
    local ns owner pid
    for ns in $(ip netns list 2>/dev/null | awk '{print $1}' | grep '^vmha-t' || true); do
        owner=${ns#vmha-t}; owner=${owner%%-*}
        [ -n "$owner" ] && [ -d "/proc/$owner" ] && continue
        for _ in 1 2 3 4 5; do
            pids=$(ip netns pids "$ns" 2>/dev/null || true)
            [ -z "$pids" ] && break
            for pid in $pids; do kill -9 "$pid" 2>/dev/null || true; done
            sleep 0.2
        done
        ip netns delete "$ns" 2>/dev/null || true
        echo "demo.sh: removed leftover namespace $ns"
    done
    for d in /var/tmp/vmha-cluster-*; do
        [ -d "$d" ] || continue
        owner=${d#/var/tmp/vmha-cluster-}; owner=${owner%%-*}
        [ -n "$owner" ] && [ -d "/proc/$owner" ] && continue
        rm -rf "$d" && echo "demo.sh: removed leftover $d"
    done
}

runner=
on_exit() {
    local rc=$?
    if [ -n "$runner" ] && kill -0 "$runner" 2>/dev/null; then
        kill -TERM "$runner" 2>/dev/null || true
        wait "$runner" 2>/dev/null || true
    fi
    cleanup_stale
    exit $rc
}
trap on_exit EXIT
trap 'exit 130' INT TERM

echo "== building (cargo build --workspace --bins; the failover test) =="
cargo build --workspace --bins
# The test executable itself is run (not through cargo), so an interrupt
# reaches it and the leftovers are found by its PID.
exe=$(cargo test -p vmha-test-infra --test failover --no-run 2>&1 |
    sed -n 's/.*Executable tests\/failover.rs (\(.*\))$/\1/p' | tail -n 1)
[ -x "$exe" ] || { echo "demo.sh: cannot find the failover test executable" >&2; exit 1; }

echo
echo "== two nodes, vm1 on node1, node1 crashes, node2 takes over =="
# Standard input goes to the test explicitly (a background job's would be
# /dev/null): it waits for Enter there when it is a terminal.
exec 3<&0
"$exe" --exact "$TEST" --nocapture --test-threads=1 <&3 3<&- &
runner=$!
wait "$runner"
runner=
echo
echo "== demo done: every namespace, daemon and mount is gone =="
