"""The transport: TCP stream, WebSocket framing, the lean WebSocket connection and the front door.

This package is the only place that touches library internals (trio-websocket, wsproto,
Hypercorn); the versions are pinned in ``pyproject.toml``. Below is **every** private name the
project relies on, each with the test that fails if an upgrade moves it.
``tests/test_stack_smoke.py`` keeps this list honest: it checks that each name still exists in the
installed library and that its guard test exists, that the modules of this package use no library
private missing from the list (and the list names none they no longer use), and that no module
outside ``bridge/net/`` (product, tools or tests) uses a library private at all (an AST scan).

Private names (``library.Owner._name``: where, why; guard):

- ``trio_websocket.WebSocketConnection._reader_task``: ``websocket.py`` starts it in the caller's
  nursery, as ``wrap_client_stream``/``wrap_server_stream`` do for their own connection.
  Guard: ``tests/test_websocket.py::test_messages_pings_and_close_both_ways``.
- ``trio_websocket.WebSocketConnection._open_handshake``: ``websocket.py`` waits for the client
  handshake on it (as ``wrap_client_stream``). Guard:
  ``tests/test_websocket.py::test_messages_pings_and_close_both_ways``.
- ``trio_websocket.WebSocketConnection._get_request``: ``websocket.py`` awaits the server
  handshake's request (as ``wrap_server_stream``). Guard:
  ``tests/test_websocket.py::test_messages_pings_and_close_both_ways``.
- ``trio_websocket.WebSocketConnection._handle_message_event``: overridden by
  ``LeanWebSocketConnection`` (the direct hand-over to ``get_message``). Guard:
  ``tests/test_websocket.py::test_fewer_scheduler_steps_per_message_than_trio_websockets_own``.
- ``trio_websocket.WebSocketConnection._message_parts``: read by that override (a message in parts
  takes trio-websocket's own path). Guard: ``tests/test_websocket.py::test_messages_pings_and_close_both_ways``.
- ``trio_websocket.WebSocketConnection._max_message_size``: read by that override (an oversized
  message takes trio-websocket's path, which closes with 1009). Guard:
  ``tests/test_websocket.py::test_an_oversized_message_is_refused_with_1009``.
- ``trio_websocket.WebSocketConnection._send_channel``: the override's ``send_nowait`` into
  ``get_message``'s queue. Guard: ``tests/test_websocket.py::test_a_full_message_queue_waits_and_loses_nothing``.
- ``trio_websocket.WebSocketConnection._send``: overridden by ``LeanWebSocketConnection`` (no
  checkpoint on an uncontended lock). Guard:
  ``tests/test_websocket.py::test_concurrent_senders_keep_every_message_whole_and_in_order``.
- ``trio_websocket.WebSocketConnection._stream_lock``: taken without a checkpoint by that override.
  Guard: ``tests/test_websocket.py::test_concurrent_senders_keep_every_message_whole_and_in_order``.
- ``trio_websocket.WebSocketConnection._wsproto``: that override frames the event through it (our
  ``FastFraming``). Guard: ``tests/test_websocket.py::test_messages_pings_and_close_both_ways``.
- ``trio_websocket.WebSocketConnection._stream``: that override writes to it. Guard:
  ``tests/test_websocket.py::test_messages_pings_and_close_both_ways``.
- ``trio_websocket.WebSocketConnection._abort_web_socket``: that override calls it when the stream
  breaks, as trio-websocket's ``_send`` does. Guard:
  ``tests/test_websocket.py::test_a_cancelled_send_sends_nothing_and_the_connection_goes_on``.
- ``trio_websocket.WebSocketConnection._close_reason``: raised in ``ConnectionClosed`` by that
  path. Guard: ``tests/test_websocket.py::test_a_cancelled_send_sends_nothing_and_the_connection_goes_on``.
- ``wsproto.connection.Connection._proto``: ``framing._at_frame_boundary`` reads the frame
  protocol under the connection. Guard:
  ``tests/test_framing.py::test_the_wsproto_layout_the_fast_path_relies_on_is_still_there``.
- ``wsproto.frame_protocol.FrameProtocol._frame_decoder``: its ``header`` and ``buffer`` tell
  whether half a frame is buffered. Guard:
  ``tests/test_framing.py::test_the_wsproto_layout_the_fast_path_relies_on_is_still_there``.
- ``wsproto.frame_protocol.FrameProtocol._message_decoder``: its ``opcode`` tells whether a
  fragmented message is in progress. Guard:
  ``tests/test_framing.py::test_the_wsproto_layout_the_fast_path_relies_on_is_still_there``.
- ``wsproto.connection.Connection._events``: events wsproto has not handed out yet. Guard:
  ``tests/test_framing.py::test_the_wsproto_layout_the_fast_path_relies_on_is_still_there``.

Other library behaviour relied on that is not a private name, but not documented API either:

- ``trio_websocket.WebSocketConnection(stream, ws_connection, ...)``: built directly
  (``websocket.py``), with a :class:`framing.FastFraming` in place of the ``wsproto.WSConnection``;
  trio-websocket uses only ``client``, ``state``, ``send``, ``receive_data`` and ``events`` of it.
  Guard: ``tests/test_websocket.py`` (lean ends against trio-websocket's own).
- ``wsproto.WSConnection.connection`` (``framing._at_frame_boundary``). Guard as ``_proto``.
- Hypercorn 0.18 serves further requests on a kept-alive connection, an upgrade too (its h11
  protocol builds a WebSocket stream for any ``GET`` with ``Upgrade: websocket``).
  ``bridge/server.py`` sets ``keep_alive_max_requests = 1`` (public ``Config``) so it closes
  each connection after one response and every request head passes the front door, and sends
  responses shielded (``close_after_response``): quart-trio cancels the send in which Hypercorn
  closes the connection, which left it open for good. Guard:
  ``tests/test_front.py::test_a_keep_alive_request_is_answered_and_the_connection_closed_after_it``.
"""
