# Sourced by the benchmarks that need etcd (bench/state.sh,
# bench/placement.sh): starts Debian's etcd-server in a temporary
# directory on free loopback ports, waits until it answers, sets
# ETCD_URL, and stops it (and removes its data) when the script exits.
command -v etcd >/dev/null || apt-get install -y -qq etcd-server >/dev/null
etcd_dir=$(mktemp -d)
etcd_ports=$(python3 -c 'import socket
s=[socket.socket() for _ in range(2)]
[x.bind(("127.0.0.1",0)) for x in s]
print(*[x.getsockname()[1] for x in s])')
read -r etcd_client etcd_peer <<<"$etcd_ports"
etcd --data-dir "$etcd_dir/data" \
    --listen-client-urls "http://127.0.0.1:$etcd_client" --advertise-client-urls "http://127.0.0.1:$etcd_client" \
    --listen-peer-urls "http://127.0.0.1:$etcd_peer" --initial-advertise-peer-urls "http://127.0.0.1:$etcd_peer" \
    --initial-cluster "default=http://127.0.0.1:$etcd_peer" --log-level error >/dev/null 2>&1 &
etcd_pid=$!
trap 'kill $etcd_pid 2>/dev/null; wait $etcd_pid 2>/dev/null; rm -rf "$etcd_dir"' EXIT
for _ in $(seq 100); do
    ETCDCTL_API=3 etcdctl --endpoints "127.0.0.1:$etcd_client" endpoint health >/dev/null 2>&1 && break
    sleep 0.1
done
ETCD_URL="http://127.0.0.1:$etcd_client"
