%% @doc Probe node of the container suite (tests/containers.rs).
%%
%% Started inside an application container with `podman exec`, as a hidden
%% node with the container's own ERL_FLAGS (so it registers with the pod's
%% distproxy and, in the mTLS variant, tunnels through it like the
%% application's nodes):
%%
%%     erl -noinput -hidden -name probe@HOST -pa DIR -s dp_container_probe main CMD ARGS...
%%
%% Commands (each prints one line `DPC <result>` and halts, 0 when ok):
%%   mesh N1 N2 ...        every node pings every other node and reports
%%                         `nodes()` over rpc: `DPC mesh ok` when each sees
%%                         all the others, else the first failure.
%%   transfer FROM TO MB   a MB-megabyte binary goes from FROM to TO
%%                         (rpc from FROM to TO); `DPC transfer ok BYTES`
%%                         when TO computed the same MD5.
%%   ping N                `DPC ping pong|pang`.
-module(dp_container_probe).

-export([main/1]).

-define(RPC_TIMEOUT, 60000).

main(Args) ->
    Result = try run([atom_to_list(A) || A <- Args])
             catch Class:Reason:Stack ->
                     {error, io_lib:format("~0p:~0p ~0p", [Class, Reason, Stack])}
             end,
    case Result of
        {ok, Text} ->
            io:format("DPC ~ts~n", [Text]),
            erlang:halt(0);
        {error, Text} ->
            io:format("DPC error ~ts~n", [Text]),
            erlang:halt(1)
    end.

run(["ping", N]) ->
    {ok, ["ping ", atom_to_list(net_adm:ping(list_to_atom(N)))]};
run(["mesh" | Names]) ->
    Nodes = [list_to_atom(N) || N <- Names],
    Pairs = [{N, M} || N <- Nodes, M <- Nodes, M =/= N],
    Pings = pmap(fun({N, M}) -> {N, M, rpc:call(N, net_adm, ping, [M], ?RPC_TIMEOUT)} end,
                 Pairs),
    case [P || {_, _, R} = P <- Pings, R =/= pong] of
        [] ->
            Seen = [{N, rpc:call(N, erlang, nodes, [], ?RPC_TIMEOUT)} || N <- Nodes],
            case [{N, S} || {N, S} <- Seen, not is_list(S) orelse (Nodes -- [N]) -- S =/= []] of
                [] -> {ok, "mesh ok"};
                Bad -> {error, io_lib:format("mesh incomplete ~0p", [Bad])}
            end;
        Bad ->
            {error, io_lib:format("mesh pings failed ~0p", [Bad])}
    end;
run(["transfer", From, To, MB]) ->
    Chunk = rand:bytes(1024 * 1024),
    Bin = binary:copy(Chunk, list_to_integer(MB)),
    Want = erlang:md5(Bin),
    case rpc:call(list_to_atom(From), rpc, call,
                  [list_to_atom(To), erlang, md5, [Bin], ?RPC_TIMEOUT],
                  ?RPC_TIMEOUT + 5000) of
        Want -> {ok, ["transfer ok ", integer_to_list(byte_size(Bin))]};
        Other -> {error, io_lib:format("transfer got ~0p", [Other])}
    end.

pmap(F, L) ->
    Parent = self(),
    Refs = [begin
                Ref = make_ref(),
                spawn_link(fun() -> Parent ! {Ref, F(X)} end),
                Ref
            end || X <- L],
    [receive {Ref, R} -> R end || Ref <- Refs].
