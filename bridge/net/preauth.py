"""Pre-authentication limits: the bookkeeping of connections that have not sent a request head yet.

Sans-IO (no Trio): the front door tells :class:`PendingConnections` when a connection arrives and
when it is no longer pending (its head is complete, or it closed, or timed out), and closes the
connections the answer names. Invariants, after every :meth:`PendingConnections.arrive`:

- at most ``max_total`` connections are pending; over it, the **oldest** pending one is evicted
  to make room, so a flood cannot lock a real caller out for the whole head deadline;
- at most ``max_per_peer`` pending connections per peer address, except trusted proxies (nginx,
  ngrok's agent: every caller arrives from their address), which count only toward the total;
  over it the **new** connection is refused at once;
- a refused connection was never counted; an evicted one is no longer counted.

Each pending connection costs one dict entry (insertion order is age order) and one counter;
``done`` is idempotent, so a connection may report itself finished on every path out.
"""

from __future__ import annotations

import ipaddress
from collections import OrderedDict
from collections.abc import Hashable, Iterable
from dataclasses import dataclass
from typing import Generic, TypeVar

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
K = TypeVar("K", bound=Hashable)


def peer_key(address: str) -> str:
    """The address a peer is counted under: IPv4-mapped IPv6 (``::ffff:1.2.3.4``) as IPv4."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ip)


@dataclass(frozen=True, slots=True)
class Admitted(Generic[K]):
    """The connection is pending now; close ``evict`` (oldest first) to keep the total."""

    evict: tuple[K, ...] = ()


@dataclass(frozen=True, slots=True)
class Refused:
    """Close the new connection at once: its peer has ``max_per_peer`` pending already."""


class PendingConnections(Generic[K]):
    """Connections without a complete request head yet, by arrival order and peer address."""

    def __init__(self, *, max_total: int, max_per_peer: int, trusted: Iterable[Network] = ()) -> None:
        if max_total < 1 or max_per_peer < 1:
            raise ValueError("limits must be at least 1")
        self.max_total = max_total
        self.max_per_peer = max_per_peer
        self._trusted = tuple(trusted)
        self._pending: OrderedDict[K, str | None] = OrderedDict()  # key -> counted peer (None: trusted)
        self._per_peer: dict[str, int] = {}
        self._trusted_cache: dict[str, bool] = {}  # bounded: cleared when it grows past max_total * 4

    def __len__(self) -> int:
        return len(self._pending)

    def is_trusted(self, address: str) -> bool:
        known = self._trusted_cache.get(address)
        if known is not None:
            return known
        try:
            ip = ipaddress.ip_address(peer_key(address))
            trusted = any(ip in network for network in self._trusted)
        except ValueError:  # not an IP address (a unix socket peer): nothing to count it under
            trusted = True
        if len(self._trusted_cache) >= self.max_total * 4:
            self._trusted_cache.clear()
        self._trusted_cache[address] = trusted
        return trusted

    def arrive(self, key: K, address: str) -> Admitted[K] | Refused:
        """A new connection from ``address``. ``key`` must not be pending already."""
        peer: str | None = None
        if not self.is_trusted(address):
            peer = peer_key(address)
            count = self._per_peer.get(peer, 0)
            if count >= self.max_per_peer:
                return Refused()
            self._per_peer[peer] = count + 1
        self._pending[key] = peer
        evict: list[K] = []
        while len(self._pending) > self.max_total:
            oldest = next(iter(self._pending))
            self.done(oldest)
            evict.append(oldest)
        return Admitted(tuple(evict))

    def done(self, key: K) -> None:
        """``key`` is no longer pending (head complete, closed, timed out or evicted). Idempotent."""
        if key not in self._pending:
            return
        peer = self._pending.pop(key)
        if peer is not None:
            left = self._per_peer[peer] - 1
            if left:
                self._per_peer[peer] = left
            else:
                del self._per_peer[peer]
