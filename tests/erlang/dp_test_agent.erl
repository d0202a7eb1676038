%% @doc Test agent for the distproxy end-to-end suite.
%%
%% Runs inside every BEAM node the harness starts (Erlang and Elixir alike).
%% The Rust harness writes one request per line on the node's stdin:
%%
%%     {Id, Command}.
%%
%% and the agent answers each on stdout with exactly one line:
%%
%%     DPR <Id> <text>
%%
%% where <text> is a single line in a command-specific, easily parsed form
%% (see handle/1). Requests run concurrently, each in its own process, so a
%% slow request never delays another; the harness matches answers by Id.
%% Any other stdout line (logger reports and the like) is kept only for the
%% failure log. End of stdin halts the node, so a harness that dies takes its
%% nodes with it.
-module(dp_test_agent).

-export([start/0, blob_receiver/2, stream_receiver/6]).

%% @doc Starts the agent and returns at once (used with `-s' and from
%% Elixir's `-e'). Prints `DPREADY <node>' when it is ready for requests.
start() ->
    User = whereis(user),
    spawn(fun() ->
                  group_leader(User, self()),
                  out("DPREADY ~ts~n", [atom_to_list(node())]),
                  loop()
          end),
    ok.

loop() ->
    case io:read(standard_io, '') of
        {ok, {Id, Cmd}} when is_integer(Id) ->
            spawn(fun() -> run(Id, Cmd) end),
            loop();
        {ok, Other} ->
            out("DPERR bad request ~0p~n", [Other]),
            loop();
        {error, Reason} ->
            out("DPERR parse ~0p~n", [Reason]),
            loop();
        _Eof ->
            erlang:halt(0)
    end.

run(Id, halt) ->
    reply(Id, "ok"),
    erlang:halt(0);
run(Id, Cmd) ->
    Text = try handle(Cmd)
           catch Class:Reason:Stack ->
                   io_lib:format("error ~0p:~0p ~0p", [Class, Reason, Stack])
           end,
    reply(Id, Text).

%% Every clause returns iodata forming one line of text.
handle(node) ->
    atom_to_list(node());
handle(creation) ->
    integer_to_list(erlang:system_info(creation));
handle(nodes) ->
    join([atom_to_list(N) || N <- lists:sort(nodes())]);
handle({ping, Node}) ->
    atom_to_list(net_adm:ping(Node));
handle({ping_all, Nodes, StartAtMs}) ->
    %% All agents receive the same wall-clock start time, so every node of
    %% the test starts its pings at the same instant.
    sleep_until(StartAtMs),
    Results = pmap(fun(N) -> net_adm:ping(N) end, Nodes),
    join([[atom_to_list(N), $=, atom_to_list(R)] || {N, R} <- Results]);
handle({ping_times, Node, Count, IntervalMs}) ->
    %% Round-trip times of Count pings to Node (microseconds; -1 for a pang),
    %% IntervalMs apart: latency through the sidecar, measured inside the VM.
    Times = [begin
                 T0 = erlang:monotonic_time(microsecond),
                 R = net_adm:ping(Node),
                 T = erlang:monotonic_time(microsecond) - T0,
                 timer:sleep(IntervalMs),
                 case R of pong -> T; pang -> -1 end
             end || _ <- lists:seq(1, Count)],
    join([integer_to_list(T) || T <- Times]);
handle({rpc_node, Node}) ->
    rpc_node(Node);
handle({rpc_node_all, Nodes}) ->
    Results = pmap(fun rpc_node/1, Nodes),
    join([[atom_to_list(N), $=, R] || {N, R} <- Results]);
handle({eval, Src}) ->
    %% An Erlang expression sequence (a string ending in a dot), evaluated
    %% on this node; the value printed with ~0p.
    {ok, Tokens, _} = erl_scan:string(Src),
    {ok, Exprs} = erl_parse:parse_exprs(Tokens),
    {value, Value, _} = erl_eval:exprs(Exprs, []),
    io_lib:format("~0p", [Value]);
handle({rpc, Node, M, F, A}) ->
    io_lib:format("~0p", [rpc:call(Node, M, F, A, 15000)]);
handle({send_blob, Node, Size}) ->
    send_blob(Node, Size);
handle({stream, Node, Count, Size, DelayMs}) ->
    stream(Node, Count, Size, DelayMs, 0);
handle({stream, Node, Count, Size, DelayMs, PauseMs}) ->
    stream(Node, Count, Size, DelayMs, PauseMs);
handle({names, Host}) ->
    case net_adm:names(Host) of
        {ok, L} ->
            ["ok", [[$\s, Name, $:, integer_to_list(Port)]
                    || {Name, Port} <- lists:sort(L)]];
        {error, Reason} ->
            io_lib:format("error ~0p", [Reason])
    end;
handle({port_please, Name, Host}) ->
    {ok, Ip} = inet:getaddr(Host, inet),
    case erl_epmd:port_please(Name, Ip) of
        {port, Port, Version} ->
            io_lib:format("port ~b ~b", [Port, Version]);
        Other ->
            io_lib:format("~0p", [Other])
    end;
handle({remote_pid_creation, Node}) ->
    %% The creation carried by a pid of Node, as this node decodes it: proves
    %% which incarnation of Node this node is talking to.
    case rpc:call(Node, erlang, self, [], 15000) of
        Pid when is_pid(Pid) ->
            integer_to_list(pid_creation(Pid));
        Other ->
            io_lib:format("error ~0p", [Other])
    end.

rpc_node(Node) ->
    case rpc:call(Node, erlang, node, [], 15000) of
        N when is_atom(N) -> atom_to_list(N);
        Other -> io_lib:format("~0p", [Other])
    end.

%% Sends a random binary of Size bytes to a fresh process on Node, which
%% answers with the MD5 it computes there. Reply:
%% "<size> <local md5 hex> <remote md5 hex> <remote size> <elapsed ms>".
send_blob(Node, Size) ->
    Bin = rand:bytes(Size),
    Local = erlang:md5(Bin),
    Ref = make_ref(),
    T0 = erlang:monotonic_time(millisecond),
    Pid = spawn(Node, ?MODULE, blob_receiver, [self(), Ref]),
    Mon = erlang:monitor(process, Pid),
    Pid ! {blob, Ref, Bin},
    receive
        {blob_md5, Ref, Remote, RemoteSize} ->
            erlang:demonitor(Mon, [flush]),
            Elapsed = erlang:monotonic_time(millisecond) - T0,
            io_lib:format("~b ~s ~s ~b ~b",
                          [Size, hex(Local), hex(Remote), RemoteSize, Elapsed]);
        {'DOWN', Mon, process, Pid, Reason} ->
            io_lib:format("error receiver_down ~0p", [Reason])
    after 40000 ->
            "error timeout"
    end.

%% @private Runs on the receiving node.
blob_receiver(From, Ref) ->
    receive
        {blob, Ref, Bin} ->
            From ! {blob_md5, Ref, erlang:md5(Bin), byte_size(Bin)}
    after 40000 ->
            exit(no_blob)
    end.

%% Sends Count copies of one random binary of Size bytes, numbered, to a
%% fresh process on Node that sleeps DelayMs before each receive (a slow
%% consumer) and checks each copy's number (order) and MD5 (content).
%% Counts the sender's busy_dist_port suspensions (system_monitor: one
%% sender per node at a time). Reply:
%% "ok <received> <bytes> <in order> <intact> <send ms> <total ms> <busy>"
%% or "error <reason> <busy>".
stream(Node, Count, Size, DelayMs, PauseMs) ->
    Bin = rand:bytes(Size),
    Md5 = erlang:md5(Bin),
    Ref = make_ref(),
    T0 = erlang:monotonic_time(millisecond),
    Pid = spawn(Node, ?MODULE, stream_receiver,
                [self(), Ref, Count, Md5, DelayMs, PauseMs > 0]),
    Mon = erlang:monitor(process, Pid),
    timer:sleep(PauseMs),
    [Pid ! {chunk, Ref, I, Bin} || I <- lists:seq(1, Count)],
    SendMs = erlang:monotonic_time(millisecond) - T0,
    receive
                {stream_done, Ref, Got, Bytes, InOrder, Intact} ->
                    Total = erlang:monotonic_time(millisecond) - T0,
                    io_lib:format("ok ~b ~b ~p ~p ~b ~b", [Got, Bytes, InOrder, Intact,
                                                            SendMs, Total]);
                {'DOWN', Mon, process, Pid, Reason} ->
                    io_lib:format("error ~0p", [Reason])
            after 120000 ->
                    "error timeout"
            end.

%% @private Runs on the receiving node of stream/5.
stream_receiver(From, Ref, Count, Md5, DelayMs, Register) ->
    Register andalso register(dp_stream_receiver, self()),
    stream_receiver(From, Ref, Count, Md5, DelayMs, 1, 0, true, true).

stream_receiver(From, Ref, Count, _Md5, _DelayMs, I, Bytes, InOrder, Intact)
  when I > Count ->
    From ! {stream_done, Ref, Count, Bytes, InOrder, Intact};
stream_receiver(From, Ref, Count, Md5, DelayMs, I, Bytes, InOrder, Intact) ->
    timer:sleep(DelayMs),
    receive
        {chunk, Ref, N, Bin} ->
            stream_receiver(From, Ref, Count, Md5, DelayMs, I + 1,
                            Bytes + byte_size(Bin), InOrder andalso N =:= I,
                            Intact andalso erlang:md5(Bin) =:= Md5)
    after 120000 ->
            exit({stream_stalled, I})
    end.

pid_creation(Pid) ->
    %% NEW_PID_EXT (88): tag, node atom, ID u32, Serial u32, Creation u32.
    Bin = term_to_binary(Pid, [{minor_version, 2}]),
    Size = byte_size(Bin),
    <<_:(Size - 4)/binary, Creation:32>> = Bin,
    Creation.

pmap(Fun, List) ->
    Parent = self(),
    Refs = [begin
                Ref = make_ref(),
                spawn_link(fun() -> Parent ! {Ref, X, Fun(X)} end),
                Ref
            end || X <- List],
    [receive {Ref, X, R} -> {X, R} end || Ref <- Refs].

sleep_until(AtMs) ->
    Now = os:system_time(millisecond),
    case AtMs - Now of
        Wait when Wait > 0 -> timer:sleep(Wait);
        _ -> ok
    end.

join(Items) ->
    lists:join($\s, Items).

hex(Bin) ->
    [io_lib:format("~2.16.0b", [B]) || <<B>> <= Bin].

reply(Id, Text) ->
    Line = [C || C <- lists:flatten(io_lib:format("~ts", [Text])),
                 C =/= $\n, C =/= $\r],
    out("DPR ~b ~ts~n", [Id, Line]).

out(Format, Args) ->
    io:format(standard_io, Format, Args).
