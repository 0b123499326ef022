"""Plain-socket probes run on lab hosts (stdlib only; run as `python scenarios/probes.py CMD ...`).

  echo  --udp IP:PORT ... [--tcp IP:PORT]   reflector: answers each UDP request with the observed
                                            source, from the sockets the request names (for filtering tests)
  send  --port P --to IP:PORT ... [--reply-from IP:PORT ...] [--wait S]
                                            one socket on port P; prints the replies it got as JSON
  punch --port P --reflector IP:PORT        learns its public mapping, prints it, reads the peer's
                                            mapping from stdin, then sends every 20 ms toward it
  tcp   --to IP:PORT                        connects, sends, expects the echo; prints JSON

Everything printed is one JSON object per line, so the test reads the output with json.loads.
Requests and replies are small JSON datagrams; bad datagrams are ignored.
"""

from __future__ import annotations

import argparse
import json
import select
import socket
import sys
import threading
import time


def addr(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


def fmt(a: tuple[str, int]) -> str:
    return f"{a[0]}:{a[1]}"


def out(obj: dict) -> None:
    print(json.dumps(obj), flush=True)


def parse_untrusted(data: bytes) -> dict | None:
    try:
        obj = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        return None
    return obj if isinstance(obj, dict) else None


def cmd_echo(args) -> None:
    socks = {}
    for text in args.udp:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind(addr(text))
        socks[fmt(sock.getsockname())] = sock
    if args.tcp:
        server = socket.create_server(addr(args.tcp))
        threading.Thread(target=tcp_echo_loop, args=(server,), daemon=True).start()
    out({"ready": sorted(socks)})
    while True:
        readable, _, _ = select.select(list(socks.values()), [], [])
        for sock in readable:
            data, src = sock.recvfrom(2048)
            req = parse_untrusted(data)
            if req is None:
                continue
            here = fmt(sock.getsockname())
            for origin in req.get("reply_from") or [here]:
                reply_sock = socks.get(origin)
                if reply_sock is None:
                    continue
                reply = {"id": req.get("id"), "observed": fmt(src), "from": origin}
                reply_sock.sendto(json.dumps(reply).encode(), src)


def tcp_echo_loop(server: socket.socket) -> None:
    while True:
        conn, src = server.accept()
        with conn:
            conn.sendall(json.dumps({"observed": fmt(src)}).encode() + b"\n")
            while chunk := conn.recv(65536):
                conn.sendall(chunk)


def udp_socket(port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("0.0.0.0", port))
    return sock


def collect(sock: socket.socket, seconds: float) -> list[tuple[bytes, tuple[str, int]]]:
    got, deadline = [], time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        readable, _, _ = select.select([sock], [], [], left)
        if readable:
            got.append(sock.recvfrom(2048))
    return got


def cmd_send(args) -> None:
    sock = udp_socket(args.port)
    for attempt in range(args.count):
        for i, target in enumerate(args.to):
            req = {"id": i, "reply_from": args.reply_from or None}
            try:
                sock.sendto(json.dumps(req).encode(), addr(target))
            except OSError as err:   # e.g. EPERM from a local firewall; the test reads it from the output
                out({"send_error": str(err)})
        if attempt + 1 < args.count:
            time.sleep(0.05)
    replies = {}
    for data, src in collect(sock, args.wait):
        rep = parse_untrusted(data)
        if rep is not None:
            replies[(rep.get("id"), fmt(src))] = {"to": args.to[rep["id"]] if isinstance(rep.get("id"), int)
                                                  and 0 <= rep["id"] < len(args.to) else None,
                                                  "from": fmt(src), "observed": rep.get("observed")}
    out({"local_port": args.port, "replies": sorted(replies.values(), key=lambda r: (r["to"] or "", r["from"]))})


def cmd_punch(args) -> None:
    sock = udp_socket(args.port)
    mapping = None
    for _ in range(20):
        sock.sendto(json.dumps({"id": 0}).encode(), addr(args.reflector))
        for data, _src in collect(sock, 0.1):
            rep = parse_untrusted(data)
            if rep and rep.get("observed"):
                mapping = rep["observed"]
        if mapping:
            break
    out({"mapping": mapping})
    peer = addr(sys.stdin.readline().strip())
    # Like WireGuard roaming: once the peer is heard, answer the address it was heard from.
    target, received, sources = peer, 0, set()
    deadline = time.monotonic() + args.duration
    while time.monotonic() < deadline:
        sock.sendto(b'{"punch": 1}', target)
        for data, src in collect(sock, 0.02):
            rep = parse_untrusted(data)
            if rep and "punch" in rep:
                received += 1
                sources.add(fmt(src))
                target = src
    out({"received": received, "from": sorted(sources)})


def cmd_tcp(args) -> None:
    try:
        with socket.create_connection(addr(args.to), timeout=args.wait) as conn:
            conn.settimeout(args.wait)
            first = conn.makefile("rb").readline()
            payload = b"x" * args.size
            conn.sendall(payload)
            conn.shutdown(socket.SHUT_WR)
            echoed = b""
            while len(echoed) < len(payload) and (chunk := conn.recv(65536)):
                echoed += chunk
        out({"ok": echoed == payload, "observed": json.loads(first).get("observed")})
    except OSError as err:
        out({"ok": False, "error": str(err)})


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("echo")
    p.add_argument("--udp", action="append", default=[])
    p.add_argument("--tcp")
    p = sub.add_parser("send")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--to", action="append", required=True)
    p.add_argument("--reply-from", action="append", default=[])
    p.add_argument("--count", type=int, default=3)
    p.add_argument("--wait", type=float, default=0.5)
    p = sub.add_parser("punch")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--reflector", required=True)
    p.add_argument("--duration", type=float, default=3.0)
    p = sub.add_parser("tcp")
    p.add_argument("--to", required=True)
    p.add_argument("--size", type=int, default=65536)
    p.add_argument("--wait", type=float, default=3.0)
    args = parser.parse_args(argv)
    {"echo": cmd_echo, "send": cmd_send, "punch": cmd_punch, "tcp": cmd_tcp}[args.cmd](args)


if __name__ == "__main__":
    main()
