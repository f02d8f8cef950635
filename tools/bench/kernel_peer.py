"""The two ends of `tools.bench.kernel`'s kernel path, each run in a namespace of its own
(`ip netns exec NS python -m tools.bench.kernel_peer ...`); no testbed import, so they start fast.

`recv PORT N`: accept one TCP connection, read N length-prefixed frames, and print one JSON
line: each frame's arrival on CLOCK_MONOTONIC (taken right after the recv() that completed
it; every namespace shares this clock). `send HOST PORT FILE`: FILE holds JSON
{"t0_delay": s, "frames": [[send_time_s, size], ...]}; connect (retrying for 10 s), write
each frame (4-byte length + payload) at t0 + its send time, and print one JSON line: t0,
the segment size and the retransmissions TCP counted (TCP_INFO). Both give up after
`LIMIT_S` wall seconds.
"""

from __future__ import annotations

import json
import socket
import struct
import sys
import time

LIMIT_S = 60.0
_TCPI_TOTAL_RETRANS = 100  # offset of tcpi_total_retrans in struct tcp_info (Linux)


def recv(port: int, n: int) -> dict:
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("0.0.0.0", port))
    srv.listen(1)
    srv.settimeout(LIMIT_S)
    conn, _ = srv.accept()
    conn.settimeout(LIMIT_S)
    end = time.monotonic() + LIMIT_S
    buf = bytearray()
    arrivals: list[float] = []
    need, header, pos = 4, True, 0
    while len(arrivals) < n and time.monotonic() < end:
        chunk = conn.recv(1 << 20)
        now = time.monotonic()
        if not chunk:
            break
        buf += chunk
        while len(buf) - pos >= need:  # walk the frames by offset; drop the bytes once
            if header:
                need = struct.unpack_from("!I", buf, pos)[0]
                pos += 4
                header = False
            else:
                pos += need
                arrivals.append(now)
                need, header = 4, True
        del buf[:pos]
        pos = 0
    return {"arrivals": arrivals}


def send(host: str, port: int, path: str) -> dict:
    with open(path) as f:
        spec = json.load(f)
    deadline = time.monotonic() + 10.0
    while True:
        try:
            s = socket.create_connection((host, port), timeout=2.0)
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    s.settimeout(LIMIT_S)
    mss = s.getsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG)
    payloads = {size: struct.pack("!I", size) + bytes(size) for _, size in spec["frames"]}
    # frames due at the same time leave in one write (a backlogged pass: one big write)
    batches: list[tuple[float, list[bytes]]] = []
    for at, size in spec["frames"]:
        if batches and batches[-1][0] == at:
            batches[-1][1].append(payloads[size])
        else:
            batches.append((at, [payloads[size]]))
    t0 = time.monotonic() + spec["t0_delay"]
    for at, parts in batches:
        wait = t0 + at - time.monotonic()
        if wait > 0:
            time.sleep(wait)
        s.sendall(b"".join(parts))
    info = s.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)
    retrans = struct.unpack_from("I", info, _TCPI_TOTAL_RETRANS)[0]
    s.shutdown(socket.SHUT_WR)
    s.settimeout(LIMIT_S)
    while s.recv(1 << 16):  # until the receiver closes: every byte has arrived
        pass
    return {"t0": t0, "mss": mss, "retrans": retrans}


def main(argv: list[str]) -> int:
    if argv[:1] == ["recv"] and len(argv) == 3:
        out = recv(int(argv[1]), int(argv[2]))
    elif argv[:1] == ["send"] and len(argv) == 4:
        out = send(argv[1], int(argv[2]), argv[3])
    else:
        print("usage: kernel_peer recv PORT N | send HOST PORT FILE", file=sys.stderr)
        return 2
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
