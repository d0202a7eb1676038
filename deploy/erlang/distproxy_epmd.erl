%% @doc An `-epmd_module' that sends this node's outgoing distribution
%% connections through the pod's distproxy sidecar.
%%
%% Everything is delegated to OTP's `erl_epmd' (registration with the
%% sidecar, which is the pod's EPMD; lookups; names) except
%% `address_please/3', which asks the local sidecar for an egress port
%% dedicated to the remote node and answers `{ok, {127,0,0,1}, Port, 6}'
%% (`{ok, {0,0,0,0,0,0,0,1}, Port, 6}' for a node of `-proto_dist
%% inet6_tcp'): the connection then goes to the sidecar on loopback, which
%% carries it to the remote pod's sidecar and names the target node there,
%% so it is routed exactly (and, when configured, over mutual TLS). The node
%% itself keeps plain `inet_tcp_dist' (or `inet6_tcp_dist') and needs no
%% certificate.
%%
%% The sidecar listens on both loopbacks with the same egress port. An
%% `inet6' node asks it over `::1' (where `erl_epmd' registers such a node),
%% an `inet' node over 127.0.0.1; so an `inet6' node whose sidecar is not
%% reachable over IPv6 falls back like any failed request.
%%
%% If the sidecar cannot answer (it is not running, it is a stock `epmd',
%% which closes the connection on the unknown request, egress is switched
%% off, or anything else goes wrong), `erl_epmd:address_please/3' is used,
%% so the node behaves exactly as without this module. So does a node of
%% its own TLS distribution (`-proto_dist inet_tls'): the remote sidecar
%% routes that TLS as it comes, undecrypted.
%%
%% Use (OTP 25 and later), with DIR the directory of distproxy_epmd.beam:
%%
%%     erl -pa DIR -epmd_module distproxy_epmd -name a1@pod-a.example ...
%%     ERL_FLAGS="-pa DIR -epmd_module distproxy_epmd"          (any erl)
%%     ELIXIR_ERL_OPTIONS="-pa DIR -epmd_module distproxy_epmd" (Elixir)
%%
%% The sidecar's EPMD port is the one `erl_epmd' uses: `-epmd_port' (which
%% `ERL_EPMD_PORT' sets), else 4369.
%%
%% Wire format of the egress request (see `src/epmd/proto.rs'):
%%
%%     request: Len:16, $E, RemoteNodeName/utf8          (Len = 1 + size)
%%     reply:   $e, Result:8, EgressPort:16, Version:16  (then close)
%%
%% Result 0 means success; anything else means "fall back".
%%
%% Successful answers are cached per remote node for ?CACHE_TTL_MS in a
%% public ETS table (owned by a small process linked to erl_epmd's), so a
%% burst of connection attempts asks the sidecar once. A node's answers are
%% dropped when it goes down, so a connection lost with a restarted
%% sidecar's egress listener is set up again through a fresh one. The TTL stays well
%% below the sidecar's `tunnel.egress_idle_timeout_ms' (60 s by default), so
%% a cached egress port is never one the sidecar has closed for idleness.
%% For a node of the node's own pod the sidecar answers the node's own
%% loopback port (no sidecar hop). That port changes when the node
%% restarts, so answers for nodes of this node's own host part are never
%% cached: a cached one would send every connection to a restarted
%% neighbour to its old, closed port for up to ?CACHE_TTL_MS, long enough
%% for `global' to disconnect this node from the whole cluster to prevent
%% overlapping partitions.
%%
%% Discovery (docs/discovery.md): `members()' returns every node of every
%% pod as the sidecar's `[discovery]' knows them (the members request,
%% `$M'). Started with `-distproxy_epmd connect true', the node keeps itself
%% connected to every member: a process started next to `erl_epmd'
%% long-polls the sidecar for the member list (answered at once when it
%% changes, else after one refresh interval) and connects to each member it
%% is not connected to, one attempt per member at a time. Members that
%% leave the list are no longer tried; OTP notices dead connections itself.
%%
%%     request: Len:16, $M, KnownVersion:32, WaitMs:32
%%     reply:   $m, 0, Version:32, RefreshMs:32, Count:16,
%%              Count x (NodeType:8, NameLen:16, FullName/utf8)  (then close)
%%     or:      $m, Result:8 (nonzero: discovery is off)
-module(distproxy_epmd).

%% The erl_epmd callback API (see the erl_epmd manual page, OTP 25).
-export([start_link/0,
         register_node/2, register_node/3,
         port_please/2, port_please/3,
         listen_port_please/2,
         address_please/3,
         names/0, names/1]).

%% For tests and diagnostics: the raw answer of the sidecar.
-export([egress_port/2, egress_port/3]).

%% Discovery.
-export([members/0, members/2]).

-define(EGRESS_REQ, $E).
-define(EGRESS_RESP, $e).
-define(DEFAULT_EPMD_PORT, 4369).
%% The connection setup timer of inet_tcp_dist is net_setuptime (7 s by
%% default); the sidecar answers at once, so these leave room for the
%% fallback.
-define(CONNECT_TIMEOUT, 2000).
-define(REPLY_TIMEOUT, 3000).
-define(CACHE, distproxy_epmd_egress_cache).
-define(CACHE_TTL_MS, 5000).
-define(MEMBERS_REQ, $M).
-define(MEMBERS_RESP, $m).
-define(NODE_TYPE_HIDDEN, 72).
%% Retry pace of the connector while the sidecar cannot answer.
-define(RETRY_MS, 5000).
-define(NOT_ALIVE_RETRY_MS, 200).

start_link() ->
    case erl_epmd:start_link() of
        {ok, Pid} = Started ->
            start_cache(Pid),
            case connect_option() of
                true -> start_connector(Pid);
                false -> ok
            end,
            Started;
        Other ->
            Other
    end.

%% The cache table lives as long as the erl_epmd process: its owner is
%% linked to it. Without the table, answers are simply not cached.
%% The owner also forgets a node's answers when the node goes down (see
%% forget_on_nodedown/0).
start_cache(EpmdPid) ->
    Parent = self(),
    Holder = spawn(fun() ->
                           try ets:new(?CACHE, [named_table, public, set,
                                                {read_concurrency, true}]) of
                               _ ->
                                   link(EpmdPid),
                                   Parent ! {self(), cache_ready},
                                   forget_on_nodedown()
                           catch
                               error:badarg ->
                                   Parent ! {self(), cache_exists}
                           end
                   end),
    receive
        {Holder, _} -> ok
    after 1000 -> ok
    end.

%% A connection that goes down may have gone down with the egress listener
%% it went through: the sidecar restarted (its listeners are gone, and the
%% next one for that node has another port) or closed it. So when a node
%% goes down its cached answers are dropped and the next connection asks
%% the sidecar again; a cached port of a restarted sidecar would otherwise
%% be refused for up to ?CACHE_TTL_MS. net_kernel starts after erl_epmd:
%% subscribe once it runs.
forget_on_nodedown() ->
    Subscribed =
        try net_kernel:monitor_nodes(true, [{node_type, all}]) of
            ok -> true;
            _ -> false
        catch
            _:_ -> false
        end,
    case Subscribed of
        true ->
            forget_loop();
        false ->
            receive after 100 -> forget_on_nodedown() end
    end.

forget_loop() ->
    receive
        {nodedown, Node, _Info} ->
            forget(Node);
        _Other ->
            ok
    end,
    forget_loop().

forget(Node) ->
    try string:split(atom_to_list(Node), "@") of
        [Name, Host] ->
            ets:match_delete(?CACHE, {{Name, Host, '_'}, '_', '_', '_'});
        _ ->
            ok
    catch
        _:_ -> ok
    end.

register_node(Name, Port) ->
    erl_epmd:register_node(Name, Port).

register_node(Name, Port, Driver) ->
    erl_epmd:register_node(Name, Port, Driver).

port_please(Name, Host) ->
    erl_epmd:port_please(Name, Host).

port_please(Name, Host, Timeout) ->
    erl_epmd:port_please(Name, Host, Timeout).

listen_port_please(Name, Host) ->
    erl_epmd:listen_port_please(Name, Host).

names() ->
    erl_epmd:names().

names(Host) ->
    erl_epmd:names(Host).

%% @doc Where to connect for node `Name@Host'. The egress port listens on
%% 127.0.0.1 and on ::1, so both IPv4 (`inet_tcp_dist', the default) and
%% IPv6 (`inet6_tcp_dist') distribution are tunnelled, each over its own
%% family's loopback; any other family falls back.
%% A node of its own TLS distribution (`-proto_dist inet_tls') connects the
%% stock way: the tunnel carries plain distribution only, and the remote
%% sidecar routes the node's TLS without decrypting it.
%%
%% net_kernel itself calls this too, to pick the distribution module for
%% a node it is about to connect to (`inet_tcp_dist:select/1', in OTP 25 and
%% later), and only looks at whether the answer is `{ok, ...}'. There it
%% gets `erl_epmd''s answer (the host resolved, as without this module), and
%% asks the sidecar only if that fails: a request to the sidecar made from
%% net_kernel would stop the whole node's distribution (every incoming
%% handshake, every other connection being set up) for the request's round
%% trip, and for a remote host's first probe. The setup process that follows
%% asks the sidecar for the port it connects to.
address_please(Name, Host, Family) when Family =:= inet; Family =:= inet6 ->
    case self() =:= whereis(net_kernel) of
        true ->
            case erl_epmd:address_please(Name, Host, Family) of
                {ok, _} = Stock -> Stock;
                {ok, _, _, _} = Stock -> Stock;
                _ -> egress_address_please(Name, Host, Family)
            end;
        false ->
            egress_address_please(Name, Host, Family)
    end;
address_please(Name, Host, Family) ->
    erl_epmd:address_please(Name, Host, Family).

egress_address_please(Name, Host, Family) ->
    case plain_tcp_dist() andalso cached_egress_port(Name, Host, Family) of
        {ok, Port, Version} ->
            {ok, loopback(Family), Port, Version};
        _StockWay ->
            erl_epmd:address_please(Name, Host, Family)
    end.

%% Whether this node's distribution is plain TCP (`inet_tcp_dist', the
%% default, or `inet6_tcp_dist'), which the tunnel carries.
plain_tcp_dist() ->
    case init:get_argument(proto_dist) of
        {ok, [[Proto | _] | _]} -> lists:member(Proto, ["inet_tcp", "inet6_tcp"]);
        _ -> true
    end.

loopback(inet) -> {127, 0, 0, 1};
loopback(inet6) -> {0, 0, 0, 0, 0, 0, 0, 1}.

cached_egress_port(Name, Host, Family) ->
    case own_host(Host) of
        true -> egress_port(Name, Host, Family);
        false -> cached_egress_port_of(Name, Host, Family)
    end.

%% Whether `Host' is this node's own host part: a node of this pod, whose
%% port changes when it restarts (see the module doc).
own_host(Host) ->
    try
        [_, Own] = string:split(atom_to_list(node()), "@"),
        string:lowercase(host_string(Host)) =:= string:lowercase(Own)
    catch
        _:_ -> false
    end.

cached_egress_port_of(Name, Host, Family) ->
    Now = erlang:monotonic_time(millisecond),
    Key = try {to_string(Name), host_string(Host), Family} catch _:_ -> undefined end,
    case cache_lookup(Key, Now) of
        {ok, _, _} = Hit ->
            Hit;
        miss ->
            case egress_port(Name, Host, Family) of
                {ok, Port, Version} = Answer ->
                    cache_store(Key, Port, Version, Now + ?CACHE_TTL_MS),
                    Answer;
                Error ->
                    Error
            end
    end.

cache_lookup(undefined, _Now) ->
    miss;
cache_lookup(Key, Now) ->
    try ets:lookup(?CACHE, Key) of
        [{Key, Port, Version, Until}] when Until > Now -> {ok, Port, Version};
        _ -> miss
    catch
        error:badarg -> miss
    end.

cache_store(undefined, _Port, _Version, _Until) ->
    ok;
cache_store(Key, Port, Version, Until) ->
    try ets:insert(?CACHE, {Key, Port, Version, Until}) of
        true -> ok
    catch
        error:badarg -> ok
    end.

%% @doc Asks the local sidecar (over 127.0.0.1) for the egress port of
%% `Name@Host'.
-spec egress_port(Name, Host) -> {ok, Port, Version} | {error, term()} when
      Name :: atom() | string(),
      Host :: atom() | string() | inet:ip_address(),
      Port :: 1..65535,
      Version :: non_neg_integer().
egress_port(Name, Host) ->
    egress_port(Name, Host, inet).

%% @doc Asks the local sidecar for the egress port of `Name@Host', over the
%% loopback of `Family' (127.0.0.1 or ::1).
-spec egress_port(Name, Host, Family) -> {ok, Port, Version} | {error, term()} when
      Name :: atom() | string(),
      Host :: atom() | string() | inet:ip_address(),
      Family :: inet | inet6,
      Port :: 1..65535,
      Version :: non_neg_integer().
egress_port(Name, Host, Family) ->
    try
        Node = unicode:characters_to_binary([to_string(Name), $@, host_string(Host)]),
        true = is_binary(Node),
        request(Node, Family)
    catch
        Class:Reason ->
            {error, {Class, Reason}}
    end.

request(Node, Family) when byte_size(Node) > 0, byte_size(Node) < 65535 ->
    Opts = [Family, binary, {packet, 0}, {active, false}, {nodelay, true}],
    case gen_tcp:connect(loopback(Family), epmd_port(), Opts, ?CONNECT_TIMEOUT) of
        {ok, Socket} ->
            try
                Len = byte_size(Node) + 1,
                ok = gen_tcp:send(Socket, [<<Len:16, ?EGRESS_REQ>>, Node]),
                case gen_tcp:recv(Socket, 6, ?REPLY_TIMEOUT) of
                    {ok, <<?EGRESS_RESP, 0, Port:16, Version:16>>} when Port > 0 ->
                        {ok, Port, Version};
                    {ok, <<?EGRESS_RESP, Result, _:32>>} ->
                        {error, {refused, Result}};
                    {ok, Other} ->
                        {error, {garbage_from_epmd, Other}};
                    {error, Reason} ->
                        %% `closed': a stock epmd, which drops unknown requests.
                        {error, Reason}
                end
            after
                gen_tcp:close(Socket)
            end;
        {error, Reason} ->
            {error, Reason}
    end.

%% @doc Every visible node of every pod (this node included), as the local
%% sidecar's discovery knows them.
-spec members() -> {ok, [node()]} | {error, term()}.
members() ->
    case members(0, 0) of
        {ok, _Version, _RefreshMs, Members} ->
            {ok, [Node || {Node, Type} <- Members, Type =/= ?NODE_TYPE_HIDDEN]};
        {error, _} = Error ->
            Error
    end.

%% @doc The raw members request: answered when the member list's version
%% differs from `KnownVersion', or after `WaitMs'. Members come with their
%% EPMD node type (77 normal, 72 hidden).
-spec members(KnownVersion, WaitMs) ->
          {ok, Version, RefreshMs, [{node(), NodeType}]} | {error, term()} when
      KnownVersion :: non_neg_integer(),
      WaitMs :: non_neg_integer(),
      Version :: non_neg_integer(),
      RefreshMs :: non_neg_integer(),
      NodeType :: byte().
members(KnownVersion, WaitMs) ->
    Opts = [binary, {packet, 0}, {active, false}, {nodelay, true}],
    case gen_tcp:connect({127, 0, 0, 1}, epmd_port(), Opts, ?CONNECT_TIMEOUT) of
        {ok, Socket} ->
            try
                ok = gen_tcp:send(Socket, <<9:16, ?MEMBERS_REQ, KnownVersion:32, WaitMs:32>>),
                case recv_all(Socket, WaitMs + ?REPLY_TIMEOUT, []) of
                    {ok, Reply} -> decode_members(Reply);
                    {error, _} = Error -> Error
                end
            catch
                Class:Reason -> {error, {Class, Reason}}
            after
                gen_tcp:close(Socket)
            end;
        {error, Reason} ->
            {error, Reason}
    end.

%% The reply ends when the sidecar closes the connection.
recv_all(Socket, Timeout, Acc) ->
    case gen_tcp:recv(Socket, 0, Timeout) of
        {ok, Data} -> recv_all(Socket, Timeout, [Acc, Data]);
        {error, closed} -> {ok, iolist_to_binary(Acc)};
        {error, Reason} -> {error, Reason}
    end.

decode_members(<<?MEMBERS_RESP, 0, Version:32, RefreshMs:32, Count:16, Rest/binary>>) ->
    case decode_entries(Count, Rest, []) of
        {ok, Members} -> {ok, Version, RefreshMs, Members};
        error -> {error, {garbage_from_epmd, Rest}}
    end;
decode_members(<<?MEMBERS_RESP, Result>>) when Result =/= 0 ->
    {error, {refused, Result}};
decode_members(<<>>) ->
    %% A stock epmd (or an older sidecar) drops unknown requests.
    {error, closed};
decode_members(Other) ->
    {error, {garbage_from_epmd, Other}}.

decode_entries(0, <<>>, Acc) ->
    {ok, lists:reverse(Acc)};
decode_entries(N, <<Type, Len:16, Name:Len/binary, Rest/binary>>, Acc) when N > 0 ->
    Node = binary_to_atom(Name, utf8),
    decode_entries(N - 1, Rest, [{Node, Type} | Acc]);
decode_entries(_, _, _) ->
    error.

%% `-distproxy_epmd connect true'
connect_option() ->
    case init:get_argument(distproxy_epmd) of
        {ok, Args} -> lists:member(["connect", "true"], Args);
        error -> false
    end.

%% The connector lives as long as `erl_epmd' (which lives as long as
%% distribution): it monitors it rather than linking to the supervisor that
%% called start_link/0.
start_connector(EpmdPid) ->
    spawn(fun() ->
                  MRef = monitor(process, EpmdPid),
                  connector(MRef, 0, #{})
          end).

%% Pending: member -> pid of its connection attempt.
connector(MRef, Version, Pending0) ->
    Pending = reap(Pending0),
    case members(Version, wait_ms()) of
        {ok, NewVersion, RefreshMs, Members} ->
            put(refresh_ms, RefreshMs),
            case is_alive() of
                true ->
                    continue(MRef, NewVersion, connect_all(Members, Pending), 0);
                false ->
                    %% Distribution is still starting: ask again shortly.
                    continue(MRef, Version, Pending, ?NOT_ALIVE_RETRY_MS)
            end;
        {error, _Reason} ->
            continue(MRef, Version, Pending, ?RETRY_MS)
    end.

continue(MRef, Version, Pending, Pause) ->
    receive
        {'DOWN', MRef, process, _, _} -> ok
    after Pause ->
            connector(MRef, Version, Pending)
    end.

%% First ask at once; then wait for a change for up to one refresh interval,
%% so that members not connected are retried about once per refresh.
wait_ms() ->
    case get(refresh_ms) of
        Ms when is_integer(Ms), Ms > 0 -> Ms;
        _ -> 0
    end.

connect_all(Members, Pending) ->
    Connected = [node() | nodes(connected)],
    lists:foldl(
      fun({Node, Type}, Acc) ->
              Skip = Type =:= ?NODE_TYPE_HIDDEN
                  orelse lists:member(Node, Connected)
                  orelse maps:is_key(Node, Acc),
              case Skip of
                  true -> Acc;
                  false -> Acc#{Node => spawn(net_kernel, connect_node, [Node])}
              end
      end, Pending, Members).

%% Forgets finished connection attempts.
reap(Pending) ->
    maps:filter(fun(_Node, Pid) -> is_process_alive(Pid) end, Pending).

epmd_port() ->
    case init:get_argument(epmd_port) of
        {ok, [[PortString | _] | _]} ->
            list_to_integer(PortString);
        _ ->
            case os:getenv("ERL_EPMD_PORT") of
                false -> ?DEFAULT_EPMD_PORT;
                PortString -> list_to_integer(PortString)
            end
    end.

to_string(Atom) when is_atom(Atom) -> atom_to_list(Atom);
to_string(String) when is_list(String) -> String.

host_string(Ip) when is_tuple(Ip) -> inet:ntoa(Ip);
host_string(Host) -> to_string(Host).
