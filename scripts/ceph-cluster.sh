#!/usr/bin/env bash
# A throw-away single-node Ceph cluster for tests: one mon, one mgr, one OSD on the memstore object store (the
# data lives in the OSD's memory), bound to 127.0.0.1 only (or to $CEPH_CLUSTER_ADDR), every file under DIR, no
# systemd.
#
#   scripts/ceph-cluster.sh start DIR   create DIR (must not exist or be empty), start the daemons, create the
#                                        pool `rbd` (size 1) and wait until its placement groups are active
#   scripts/ceph-cluster.sh env DIR     print `export CEPH_CONF=DIR/ceph.conf` (the conf names the keyring):
#                                        then `rbd`, `ceph`, QEMU's rbd driver and `qwamos volume` reach it
#   scripts/ceph-cluster.sh stop DIR    kill the daemons by their pid files (TERM, then KILL), wait until each
#                                        is gone, remove DIR
#
# Ports: the mon listens (msgr2 only) on a free port picked at start; the mgr and OSD bind free ports of
# Ceph's 6800-7300 range, so several clusters (parallel test runs) can coexist.  Ceph 16 (Debian 12:
# ceph-mon ceph-mgr ceph-osd ceph-common, installed by scripts/install-deps.sh).  Start takes ~15 s.
#
# CEPH_CLUSTER_ADDR=IPV4 (start only; default 127.0.0.1): the one address every daemon binds and the conf names
# for the mon, e.g. the root end of a veth pair, so that a client in another network namespace reaches the
# cluster over it (tests/test_vm_rbd.py's two hosts).  The address must already be assigned to an interface.
# CEPH_CLUSTER_OSD_BYTES=N (start only; default 2147483648, 8589934592 for bluestore): the OSD's size.  Memstore
# does not refuse writes past it: the monitor marks the OSD (and the pools) full from the usage it reports, a few
# seconds later, and from then on writes get ENOSPC.  A small size is how to fill the cluster for real.
# CEPH_CLUSTER_STORE=memstore|memstore-pages|bluestore (start only; default memstore): the OSD's object store.
#   memstore        objects in memory, each object's data a list of the buffers written to it (memstore's
#                   default): a write's cost grows with the number of pieces earlier writes cut the object
#                   into, and every received buffer is kept (docs/design.md, "4 KiB random writes");
#   memstore-pages  objects in memory in 64 KiB pages (memstore_page_set): a write copies into its pages, a
#                   cost that does not grow with the object's history;
#   bluestore       Ceph's production store, on a sparse file DIR/osd.0.block (the disk's speed counts).
# CEPH_CLUSTER_TIMEOUT=SECONDS (start only; default 120): how long to wait for the placement groups.
set -euo pipefail

usage() {
    echo "usage: $0 start|stop|env DIR" >&2
    exit 2
}
(($# == 2)) || usage
action=$1
dir=$2
TIMEOUT=${CEPH_CLUSTER_TIMEOUT:-120} # seconds to wait for the cluster to come up
ADDR=${CEPH_CLUSTER_ADDR:-127.0.0.1}
STORE=${CEPH_CLUSTER_STORE:-memstore}

log() { echo "ceph-cluster: $*" >&2; }

free_port() {
    python3 -c 'import socket, sys; s = socket.socket(); s.bind((sys.argv[1], 0)); print(s.getsockname()[1])' "$ADDR"
}

ceph_cli() { ceph --conf "$dir/ceph.conf" --connect-timeout 30 "$@"; }

stop() {
    local pidfile pid n
    [[ -d $dir ]] || return 0
    # The daemons write $dir/run/NAME.pid when they daemonise; kill exactly those processes, never by name.
    for pidfile in "$dir"/run/*.pid; do
        [[ -f $pidfile ]] || continue
        pid=$(<"$pidfile")
        [[ $pid =~ ^[0-9]+$ ]] || continue
        kill -TERM "$pid" 2>/dev/null || true
    done
    for pidfile in "$dir"/run/*.pid; do
        [[ -f $pidfile ]] || continue
        pid=$(<"$pidfile")
        [[ $pid =~ ^[0-9]+$ ]] || continue
        for ((n = 0; n < 100; n++)); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        if kill -0 "$pid" 2>/dev/null; then
            log "pid $pid ($(basename "$pidfile" .pid)) ignored TERM for 10 s: KILL"
            kill -KILL "$pid" 2>/dev/null || true
            for ((n = 0; n < 50; n++)); do
                kill -0 "$pid" 2>/dev/null || break
                sleep 0.1
            done
        fi
    done
    rm -rf "$dir"
}

start() {
    if ! [[ $ADDR =~ ^[0-9]{1,3}(\.[0-9]{1,3}){3}$ ]]; then
        log "CEPH_CLUSTER_ADDR must be an IPv4 address, not '$ADDR'"
        exit 2
    fi
    case $STORE in
    memstore | memstore-pages | bluestore) ;;
    *)
        log "CEPH_CLUSTER_STORE must be memstore, memstore-pages or bluestore, not '$STORE'"
        exit 2
        ;;
    esac
    if [[ -e $dir ]] && [[ -n $(ls -A "$dir") ]]; then
        log "$dir exists and is not empty"
        exit 1
    fi
    for tool in ceph-mon ceph-mgr ceph-osd ceph ceph-authtool monmaptool; do
        command -v "$tool" >/dev/null || {
            log "$tool not found (scripts/install-deps.sh installs Ceph)"
            exit 3
        }
    done
    mkdir -p "$dir"
    dir=$(cd "$dir" && pwd)
    mkdir -p "$dir/run" "$dir/log" "$dir/mon.a" "$dir/mgr.x" "$dir/osd.0"
    local store_conf
    if [[ $STORE == bluestore ]]; then
        # The block file lies beside the OSD's directory: BlueStore makes DIR/osd.0/block a link to it.
        store_conf="osd objectstore = bluestore
bluestore block path = $dir/osd.\$id.block
bluestore block create = true
bluestore block size = ${CEPH_CLUSTER_OSD_BYTES:-8589934592}
bluestore block db create = false
bluestore block wal create = false"
    else
        store_conf="osd objectstore = memstore
memstore device bytes = ${CEPH_CLUSTER_OSD_BYTES:-2147483648}
memstore page set = $([[ $STORE == memstore-pages ]] && echo true || echo false)"
    fi
    # From here on a failure tears down whatever started.
    trap 'log "start failed; logs: $dir/log"; tail -n 20 "$dir"/log/*.log >&2 2>/dev/null || true; stop' ERR

    local fsid port osd_uuid
    fsid=$(python3 -c 'import uuid; print(uuid.uuid4())')
    osd_uuid=$(python3 -c 'import uuid; print(uuid.uuid4())')
    port=$(free_port)
    cat >"$dir/ceph.conf" <<EOF
[global]
fsid = $fsid
mon host = [v2:$ADDR:$port]
public addr = $ADDR
public network = $ADDR/32
ms bind ipv4 = true
ms bind ipv6 = false
ms bind msgr1 = false
auth cluster required = cephx
auth service required = cephx
auth client required = cephx
keyring = $dir/keyring
run dir = $dir/run
admin socket = $dir/run/\$name.asok
pid file = $dir/run/\$name.pid
log file = $dir/log/\$name.log
crash dir = $dir/crash
osd pool default size = 1
osd pool default min size = 1
osd pool default pg autoscale mode = off
osd crush chooseleaf type = 0
mon allow pool size one = true
mon warn on pool no redundancy = false
mon data avail warn = 1
mon data avail crit = 0

[client]
# Ceph 16's librbd sends writes on at once (policy writearound) and is writethrough until the first flush; a
# writeback cache from the start, written back after 10 minutes at the earliest, makes a client that forgets
# to flush lose its writes on kill -9, so the tests see it (tests/test_storage_rbd.py, the kill -9 test)
rbd cache = true
rbd cache policy = writeback
rbd cache writethrough until flush = false
rbd cache max dirty age = 600

[mon]
mon data = $dir/mon.\$id
mon allow pool delete = true
mon cluster log file = $dir/log/cluster.log

[mgr]
mgr data = $dir/mgr.\$id
mgr disabled modules = dashboard restful prometheus

[osd]
osd data = $dir/osd.\$id
$store_conf
osd max object name len = 460
osd max object namespace len = 64
EOF
    # One keyring for every entity; the mon imports it (keys and caps) when it creates its store.
    ceph-authtool --create-keyring "$dir/keyring" --gen-key -n mon. --cap mon 'allow *' >/dev/null
    ceph-authtool "$dir/keyring" --gen-key -n client.admin \
        --cap mon 'allow *' --cap osd 'allow *' --cap mgr 'allow *' --cap mds 'allow *' >/dev/null
    ceph-authtool "$dir/keyring" --gen-key -n mgr.x \
        --cap mon 'allow profile mgr' --cap osd 'allow *' --cap mds 'allow *' >/dev/null
    ceph-authtool "$dir/keyring" --gen-key -n osd.0 \
        --cap mon 'allow profile osd' --cap mgr 'allow profile osd' --cap osd 'allow *' >/dev/null
    chmod 600 "$dir/keyring"
    monmaptool --create --fsid "$fsid" --addv a "[v2:$ADDR:$port]" "$dir/monmap" >/dev/null

    ceph-mon --conf "$dir/ceph.conf" --mkfs -i a --monmap "$dir/monmap" --keyring "$dir/keyring"
    ceph-mon --conf "$dir/ceph.conf" -i a
    ceph-mgr --conf "$dir/ceph.conf" -i x
    ceph_cli osd new "$osd_uuid" 0 >/dev/null
    ceph-osd --conf "$dir/ceph.conf" -i 0 --mkfs --osd-uuid "$osd_uuid" 2>>"$dir/log/osd-mkfs.log"
    ceph-osd --conf "$dir/ceph.conf" -i 0 2>>"$dir/log/osd-start.log"

    ceph_cli osd pool create rbd 8 8 >/dev/null 2>&1
    ceph_cli osd pool application enable rbd rbd >/dev/null 2>&1
    local deadline=$((SECONDS + TIMEOUT)) stat=""
    while ((SECONDS < deadline)); do
        stat=$(ceph_cli pg stat 2>/dev/null || true)
        if [[ $stat =~ ^([0-9]+)\ pgs:\ ([0-9]+)\ active\+clean ]] && [[ ${BASH_REMATCH[1]} == "${BASH_REMATCH[2]}" ]] \
            && ((BASH_REMATCH[1] > 0)); then
            trap - ERR
            log "up: $dir (mon $ADDR:$port)"
            return 0
        fi
        sleep 0.5
    done
    log "placement groups not active after ${TIMEOUT}s: $stat"
    false
}

case $action in
start) start ;;
stop) stop ;;
env) echo "export CEPH_CONF=$(cd "$dir" && pwd)/ceph.conf" ;;
*) usage ;;
esac
