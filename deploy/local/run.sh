#!/usr/bin/env bash
# Runs distproxy on one Linux machine without Kubernetes: three network-
# namespace "pods" on a private bridge, each with a distproxy sidecar and
# several BEAM nodes whose distribution listens on 127.0.0.1 only, then
# prints which node reaches which. Every cross-pod byte passes through a
# sidecar. Needs root, iproute2 and erlang-nox; cleans up on exit.
#
#   sudo deploy/local/run.sh            # 3 pods x 3 nodes
#   PODS="a b" NODES=2 sudo deploy/local/run.sh
#   DISTPROXY_BIN=/path/to/distproxy sudo deploy/local/run.sh
#
# Exit status: 0 when every node reaches every other node, 1 otherwise.
set -euo pipefail

PODS=${PODS:-"a b c"}
NODES=${NODES:-3}
COOKIE=${COOKIE:-distproxy-local}
PREFIX=${PREFIX:-dpl$$}
NET=${NET:-198.19.77}
here=$(cd "$(dirname "$0")" && pwd)
top=$(cd "$here/../.." && pwd)

die() { echo "deploy/local: $*" >&2; exit 2; }
[ "$(id -u)" -eq 0 ] || die "must run as root (creates network namespaces)"
command -v ip >/dev/null || die "iproute2 is missing (apt-get install iproute2)"
command -v erl >/dev/null || die "erl is missing (apt-get install erlang-nox)"

BIN=${DISTPROXY_BIN:-}
if [ -z "$BIN" ]; then
  BIN="$top/target/release/distproxy"
  if [ ! -x "$BIN" ]; then
    echo "building distproxy (release)..." >&2
    (cd "$top" && cargo build --release --quiet --bin distproxy)
  fi
fi
[ -x "$BIN" ] || die "distproxy binary not found at $BIN"

work=$(mktemp -d "/tmp/$PREFIX.XXXX")
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true; done
  sleep 0.3
  for pid in "${pids[@]}"; do kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true; done
  for pod in $PODS; do
    ip netns del "$PREFIX-$pod" 2>/dev/null || true
    rm -rf "/etc/netns/$PREFIX-$pod"
  done
  ip netns del "$PREFIX-br" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT INT TERM

# The bridge lives in its own namespace: the host's network is untouched.
ip netns add "$PREFIX-br"
ip -n "$PREFIX-br" link add br0 type bridge
ip -n "$PREFIX-br" link set br0 up

hosts="127.0.0.1 localhost"
i=10
for pod in $PODS; do
  hosts="$hosts
$NET.$i pod-$pod.dp.local"
  i=$((i + 1))
done

i=10
for pod in $PODS; do
  ns="$PREFIX-$pod"
  ip netns add "$ns"
  mkdir -p "/etc/netns/$ns"
  printf '%s\n' "$hosts" > "/etc/netns/$ns/hosts"
  ip link add "v$PREFIX$pod" type veth peer name eth0 netns "$ns"
  ip link set "v$PREFIX$pod" netns "$PREFIX-br"
  ip -n "$PREFIX-br" link set "v$PREFIX$pod" master br0 up
  ip -n "$ns" link set lo up
  ip -n "$ns" addr add "$NET.$i/24" dev eth0
  ip -n "$ns" link set eth0 up
  i=$((i + 1))
done

# Sidecars.
for pod in $PODS; do
  setsid ip netns exec "$PREFIX-$pod" "$BIN" run >"$work/sidecar-$pod.log" 2>&1 &
  pids+=($!); disown
done
for pod in $PODS; do
  for _ in $(seq 50); do
    ip netns exec "$PREFIX-$pod" bash -c 'exec 3<>/dev/tcp/127.0.0.1/9369' 2>/dev/null && break
    sleep 0.1
  done
done

# Every node, in every pod.
all=()
for pod in $PODS; do
  for n in $(seq "$NODES"); do all+=("$pod$n@pod-$pod.dp.local"); done
done
printf '%s\n' "${all[@]}" > "$work/nodes"

# Each node waits for the go file, pings every other node (all at once, in
# parallel processes; -connect_all false, so only these pings connect),
# retries a pang once at once (two nodes connecting to each other at the
# same instant may both give up, as without distproxy), writes
# "Target pong|pang" lines, then idles.
probe='
  Go = filename:join(os:getenv("DPL_WORK"), "go"),
  Wait = fun W() -> case filelib:is_file(Go) of true -> ok; false -> timer:sleep(50), W() end end,
  Wait(),
  {ok, Bin} = file:read_file(filename:join(os:getenv("DPL_WORK"), "nodes")),
  Targets = [list_to_atom(binary_to_list(T)) || T <- binary:split(Bin, <<"\n">>, [global, trim_all])] -- [node()],
  Self = self(),
  [spawn(fun() -> Self ! {T, net_adm:ping(T)} end) || T <- Targets],
  First = [receive {T, R} -> {T, R} after 30000 -> {T, timeout} end || T <- Targets],
  Retry = [T || {T, R} <- First, R =/= pong],
  [spawn(fun() -> Self ! {retry, T, net_adm:ping(T)} end) || T <- Retry],
  Again = [receive {retry, T, R} -> {T, R} after 30000 -> {T, timeout} end || T <- Retry],
  Results = [{T, proplists:get_value(T, Again, R)} || {T, R} <- First],
  Out = [io_lib:format("~s ~s~n", [T, R]) || {T, R} <- Results],
  ok = file:write_file(filename:join(os:getenv("DPL_WORK"), atom_to_list(node()) ++ ".result"), Out),
  timer:sleep(infinity).'
for pod in $PODS; do
  for n in $(seq "$NODES"); do
    name="$pod$n@pod-$pod.dp.local"
    DPL_WORK="$work" setsid ip netns exec "$PREFIX-$pod" erl -noshell -noinput \
      -name "$name" -setcookie "$COOKIE" -start_epmd false -connect_all false \
      -kernel inet_dist_use_interface '{127,0,0,1}' \
      -eval "$probe" >"$work/$pod$n.log" 2>&1 &
    pids+=($!); disown
  done
done

# Wait for every node to be registered with its pod's sidecar, then go.
for pod in $PODS; do
  for _ in $(seq 200); do
    count=$(ip netns exec "$PREFIX-$pod" "$BIN" names 2>/dev/null | grep -c '^name ' || true)
    [ "$count" -ge "$NODES" ] && break
    sleep 0.1
  done
done
touch "$work/go"

total=${#all[@]}
for _ in $(seq 600); do
  done_count=$(find "$work" -name '*.result' | wc -l)
  [ "$done_count" -ge "$total" ] && break
  sleep 0.1
done

# The table: rows ping columns.
short() { echo "${1%%@*}"; }
printf '%-8s' "from\\to"
for t in "${all[@]}"; do printf ' %-5s' "$(short "$t")"; done
echo
failures=0
for f in "${all[@]}"; do
  printf '%-8s' "$(short "$f")"
  for t in "${all[@]}"; do
    if [ "$f" = "$t" ]; then
      cell="-"
    else
      r=$(grep -s "^$t " "$work/$f.result" | awk '{print $2}')
      case "$r" in
        pong) cell="pong" ;;
        "") cell="?"; failures=$((failures + 1)) ;;
        *) cell="$r"; failures=$((failures + 1)) ;;
      esac
    fi
    printf ' %-5s' "$cell"
  done
  echo
done

if [ "$failures" -eq 0 ]; then
  echo "all $((total * (total - 1))) pairs reachable"
  exit 0
fi
echo "$failures pairs NOT reachable; sidecar logs:" >&2
for pod in $PODS; do echo "--- pod $pod" >&2; tail -n 20 "$work/sidecar-$pod.log" >&2; done
exit 1
