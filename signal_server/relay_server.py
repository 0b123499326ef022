"""`meshwg-signal relay --region NAME --secret-file FILE`: STUN and the UDP/TCP relay of one region, with no
database (issue 14.3). Nodes are admitted by the credentials the control plane signs (relay_auth; RelayCore's
verifier), checked against the credential key in the relay's secret; the relay's own key (the one nodes box their
HELLOs to) is in the secret too. The same shells as the server's relay (relay_udp, relay_tcp, the compiled
forwarder) around the same RelayCore: this class gives them what they use of a SignalServer.

What a relay without the control plane cannot do: publish the address a node's relay traffic came from (the
server's own relay does, for birthday punching), nor drop a removed node's session before its credential expires
(relay_auth.CRED_TTL)."""

from __future__ import annotations

import logging
import os
import resource
import signal
import time
from collections import Counter
from dataclasses import dataclass, field

import trio
from nacl.signing import VerifyKey

from meshwg import sdnotify
from meshwg.config.keys import key_to_base64
from signal_server import metrics, relay_auth, service_notify
from signal_server.conn_limits import SourceLimits, relay_tcp_caps
from signal_server.lograte import RepeatLimiter, install_repeat_filter
from signal_server.relay import RelayCore, limit_kwargs
from signal_server.relay_tcp import RelayTcp
from signal_server.relay_udp import RelayUdp
from signal_server.server import Bound, _addrs

log = logging.getLogger("signal")


class _NoCore:
    """The control core's one method the relay shells call: a regional relay publishes no observed addresses."""

    @staticmethod
    def observed(events) -> list:
        return []


@dataclass
class RelayConfig:
    region: str
    relay_private: bytes
    credential_key: bytes
    udp: list = field(default_factory=lambda: [("0.0.0.0", 3478)])
    stun_alt_port: int | str | None = "auto"
    relay_tcp: list = field(default_factory=lambda: [("0.0.0.0", 7301)])
    metrics: list = field(default_factory=list)
    plain_udp: tuple | None = None  # a regional relay has no plain port (the ingress needs the directory)
    accept_rate: float = 10.0
    accept_burst: float = 40.0
    relay_tcp_max: int | None = None
    relay_tcp_max_per_source: int | None = None
    relay_tcp_fd_share: float = 0.5
    relay_hello_timeout: float = 3.0
    relay_node_rate: float = 400.0
    relay_node_pps: float | None = None
    relay_total_rate: float = 0.0
    log_repeat_interval: float = 30.0
    send_timeout: float = 10.0
    stop_on_sigterm: bool = False
    control_enabled: bool = False  # read by the shared shells (service status)


def load_secret(path: str, region: str) -> tuple[bytes, bytes]:
    """(relay private key, credential key) from the secret file; ValueError (one line) when unusable."""
    try:
        with open(path) as f:
            text = f.read(4096)
    except OSError as exc:
        raise ValueError(f"{path}: cannot read the relay secret: {exc.strerror or exc}") from None
    try:
        got, sk, cred_pub = relay_auth.parse_secret(text)
    except relay_auth.RelaySecretError as exc:
        raise ValueError(f"{path}: {exc}") from None
    if got != region:
        raise ValueError(f"{path}: the secret is region {got!r}'s, not {region!r} "
                         f"(`meshwg-signal relay-secret {region}` on the control server makes one)")
    return sk, cred_pub


class RegionalRelay:
    def __init__(self, cfg: RelayConfig) -> None:
        self.cfg = cfg
        vk = VerifyKey(cfg.credential_key)

        def verifier(key: bytes, cred: bytes, wall: float):
            return relay_auth.check_untrusted(vk, key, cred, wall)

        self.relay = RelayCore(cfg.relay_private, os.urandom, verifier=verifier, **limit_kwargs(
            cfg.relay_node_rate, cfg.relay_node_pps, cfg.relay_total_rate))
        self.counters: Counter = Counter()
        self.core = _NoCore()
        self.sessions: dict = {}  # no control sessions (service status counts them)
        self.bound = Bound()
        self.relay_udp = RelayUdp(self)
        self.relay_tcp_listener = RelayTcp(self, self.relay_udp.relay_send, self.relay_udp.relay_send_many)
        self.sd = sdnotify.take()
        self.started = time.monotonic()
        from meshwg.wg.crypto import dh_pub

        self.public_key = dh_pub(cfg.relay_private)

    def apply(self, effects) -> None:
        """The relay shells hand control-core effects here: a regional relay has none."""

    def gauges(self) -> dict:
        return {"relay_sessions": len(self.relay.by_key), "relay_tcp_connections": self.relay_limits.active,
                "relay_tcp_connections_max": self.relay_limits.total,
                "uptime_seconds": round(time.monotonic() - self.started, 1)}

    def render_metrics(self) -> str:
        self.relay_udp.fold_counters()
        return metrics.render(self.counters + self.relay.counters, self.gauges())

    async def run(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        cfg, bound = self.cfg, self.bound
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        total, per_source = relay_tcp_caps(soft, cfg.relay_tcp_fd_share, cfg.relay_tcp_max, cfg.relay_tcp_max_per_source)
        self.relay_limits = SourceLimits(total, per_source, cfg.accept_rate, cfg.accept_burst)
        self.log_repeat = RepeatLimiter(cfg.log_repeat_interval)
        install_repeat_filter("trio.serve_listeners", cfg.log_repeat_interval)
        try:
            async with trio.open_nursery() as nursery:
                if cfg.stop_on_sigterm:
                    await nursery.start(self._stop_on_sigterm, nursery.cancel_scope)
                bound.udp, bound.stun_alt = self.relay_udp.bind(nursery, cfg.udp, cfg.stun_alt_port)
                for host, port in cfg.relay_tcp:
                    bound.relay_tcp += await self.relay_tcp_listener.listen(nursery, host, port)
                for host, port in cfg.metrics:
                    ls = await trio.open_tcp_listeners(port, host=host)
                    bound.metrics += [l.socket.getsockname()[:2] for l in ls]
                    nursery.start_soon(metrics.serve_metrics, ls, self.render_metrics)
                nursery.start_soon(self._expire)
                log.info("relay region %s: udp (stun+relay) %s, stun alternate %s, relay tcp %s, metrics %s; "
                         "relay key %s, credentials by %s", cfg.region,
                         *(_addrs(a) for a in (bound.udp, bound.stun_alt, bound.relay_tcp, bound.metrics)),
                         key_to_base64(self.public_key), key_to_base64(cfg.credential_key))
                nursery.start_soon(service_notify.run, self, self.sd)
                task_status.started(bound)
        finally:
            self.relay_udp.close()

    async def _expire(self) -> None:
        while True:
            await trio.sleep(1.0)
            self.relay.expire(time.monotonic())

    async def _stop_on_sigterm(self, scope: trio.CancelScope, task_status=trio.TASK_STATUS_IGNORED) -> None:
        with trio.open_signal_receiver(signal.SIGTERM) as signals:
            task_status.started()
            async for _ in signals:
                log.info("SIGTERM: shutting down (%d relay sessions)", len(self.relay.by_key))
                self.sd.stopping()
                scope.cancel()
                return
