"""The transport: TCP stream, WebSocket framing, the lean WebSocket connection and the front door.

This package is the only place that touches library internals (trio-websocket, wsproto, Hypercorn).
"""
