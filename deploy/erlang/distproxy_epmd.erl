%% @doc An `-epmd_module' that sends this node's outgoing distribution
%% connections through the pod's distproxy sidecar.
%%
%% Everything is delegated to OTP's `erl_epmd' (registration with the
%% sidecar, which is the pod's EPMD; lookups; names) except
%% `address_please/3', which asks the local sidecar for an egress port
%% dedicated to the remote node and answers `{ok, {127,0,0,1}, Port, 6}':
%% the connection then goes to the sidecar on loopback, which carries it to
%% the remote pod's sidecar and names the target node there, so it is routed
%% exactly (and, when configured, over mutual TLS). The node itself keeps
%% plain `inet_tcp_dist' and needs no certificate.
%%
%% If the sidecar cannot answer (it is not running, it is a stock `epmd',
%% which closes the connection on the unknown request, egress is switched
%% off, or anything else goes wrong), `erl_epmd:address_please/3' is used,
%% so the node behaves exactly as without this module.
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
%% burst of connection attempts asks the sidecar once. The TTL stays well
%% below the sidecar's `tunnel.egress_idle_timeout_ms' (60 s by default), so
%% a cached egress port is never one the sidecar has closed for idleness.
%% For a node of the node's own pod the sidecar answers the node's own
%% loopback port (no sidecar hop).
-module(distproxy_epmd).

%% The erl_epmd callback API (see the erl_epmd manual page, OTP 25).
-export([start_link/0,
         register_node/2, register_node/3,
         port_please/2, port_please/3,
         listen_port_please/2,
         address_please/3,
         names/0, names/1]).

%% For tests and diagnostics: the raw answer of the sidecar.
-export([egress_port/2]).

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

start_link() ->
    case erl_epmd:start_link() of
        {ok, Pid} = Started ->
            start_cache(Pid),
            Started;
        Other ->
            Other
    end.

%% The cache table lives as long as the erl_epmd process: its owner is
%% linked to it. Without the table, answers are simply not cached.
start_cache(EpmdPid) ->
    Parent = self(),
    Holder = spawn(fun() ->
                           try ets:new(?CACHE, [named_table, public, set,
                                                {read_concurrency, true}]) of
                               _ ->
                                   link(EpmdPid),
                                   Parent ! {self(), cache_ready},
                                   receive after infinity -> ok end
                           catch
                               error:badarg ->
                                   Parent ! {self(), cache_exists}
                           end
                   end),
    receive
        {Holder, _} -> ok
    after 1000 -> ok
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

%% @doc Where to connect for node `Name@Host'. The egress listener is on
%% 127.0.0.1, so only IPv4 distribution (`inet_tcp_dist', the default) is
%% tunnelled; `inet6' falls back.
address_please(Name, Host, inet = Family) ->
    case cached_egress_port(Name, Host) of
        {ok, Port, Version} ->
            {ok, {127, 0, 0, 1}, Port, Version};
        {error, _Reason} ->
            erl_epmd:address_please(Name, Host, Family)
    end;
address_please(Name, Host, Family) ->
    erl_epmd:address_please(Name, Host, Family).

cached_egress_port(Name, Host) ->
    Now = erlang:monotonic_time(millisecond),
    Key = try {to_string(Name), host_string(Host)} catch _:_ -> undefined end,
    case cache_lookup(Key, Now) of
        {ok, _, _} = Hit ->
            Hit;
        miss ->
            case egress_port(Name, Host) of
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

%% @doc Asks the local sidecar for the egress port of `Name@Host'.
-spec egress_port(Name, Host) -> {ok, Port, Version} | {error, term()} when
      Name :: atom() | string(),
      Host :: atom() | string() | inet:ip_address(),
      Port :: 1..65535,
      Version :: non_neg_integer().
egress_port(Name, Host) ->
    try
        Node = unicode:characters_to_binary([to_string(Name), $@, host_string(Host)]),
        true = is_binary(Node),
        request(Node)
    catch
        Class:Reason ->
            {error, {Class, Reason}}
    end.

request(Node) when byte_size(Node) > 0, byte_size(Node) < 65535 ->
    Opts = [binary, {packet, 0}, {active, false}, {nodelay, true}],
    case gen_tcp:connect({127, 0, 0, 1}, epmd_port(), Opts, ?CONNECT_TIMEOUT) of
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
