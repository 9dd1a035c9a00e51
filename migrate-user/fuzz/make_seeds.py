#!/usr/bin/env python3
"""Writes the seed corpus of the image_decode target: small valid images in the format that
migrate-user/src/image/mod.rs documents (big-endian, CRC-32 per record). Each seed starts with
the target's chunk-size byte. Run from this directory: python3 make_seeds.py
It also writes the seeds of transport_frames (see the end of this file)."""
import ipaddress, os, struct, zlib

def record(kind, body):
    head = struct.pack(">IB", 4 + 1 + len(body) + 4, kind) + body
    return head + struct.pack(">I", zlib.crc32(head))

def connection(local, lport, remote, rport, send=b"", unsent=0, recv=b"", flags=0b1111, state=1):
    la, ra = ipaddress.ip_address(local), ipaddress.ip_address(remote)
    v6 = la.version == 6
    body = struct.pack(">HBB", flags | (1 if v6 else 0), state, 7 | (9 << 4))
    body += la.packed + struct.pack(">H", lport) + ra.packed + struct.pack(">H", rport)
    body += struct.pack(">II", 0xDEADBEEF, 7) + struct.pack(">5I", 1, 2, 3, 4, 5)
    body += struct.pack(">HI", 1448, 123456) + struct.pack(">HHB", 60, 5, 3)
    body += struct.pack(">IIIIB", 30000, 87040, 131072, 0xC114, 0x10)
    body += struct.pack(">III", len(send), unsent, len(recv)) + send + recv
    return record(1, body)

def image(conns, version=2):
    return b"TCPMIGIM" + struct.pack(">HH", version, 0) + b"".join(conns) + record(2, struct.pack(">I", len(conns)))

seeds = {
    "empty": image([]),
    "one_v4_idle": image([connection("198.18.0.100", 80, "198.18.0.1", 40000)]),
    "one_v4_idle_version1": image([connection("198.18.0.100", 80, "198.18.0.1", 40000)], 1),
    # CLOSE_WAIT (8) and LAST_ACK (9) with queued bytes.
    "half_closed": image([
        connection("198.18.0.100", 80, "198.18.0.1", 40001, b"", 0, b"bye", state=8),
        connection("fd54:636d::100", 80, "fd54:636d::1", 40002, b"last", 4, b"", state=9),
    ]),
    "one_v6_queues": image([connection("fd54:636d::100", 443, "fd54:636d::1", 50000, b"hello", 2, b"world!")]),
    "three_mixed": image([
        connection("198.18.0.100", 8080, "198.18.0.1", 1024, b"abc", 1, b"x"),
        connection("fd54:636d::100", 8080, "fd54:636d::1", 1025),
        connection("127.0.0.1", 1, "127.0.0.1", 2, b"", 0, b"y" * 40, flags=0),
    ]),
}
os.makedirs("seeds/image_decode", exist_ok=True)
for name, data in seeds.items():
    for chunk in (1, 7, 255):
        with open(f"seeds/image_decode/{name}_{chunk}", "wb") as f:
            f.write(bytes([chunk]) + data)

# transport_frames: frames of the migrate <-> agent link (migrate-user/src/migrate/transport.rs):
# a 4-byte big-endian length, then a tag (0: JSON message, 1: image piece) and the body. Each seed
# starts with the target's chunk-size byte and its limit byte (bit 0: authenticated link).
import json

def frame(tag, body):
    return struct.pack(">I", 1 + len(body)) + bytes([tag]) + body

def message(**fields):
    return frame(0, json.dumps(fields, separators=(",", ":")).encode())

report = dict(restored=3, live=3, failed=0, first_failure=None, freeze_ms=1.5, restore_ms=0.25,
              address_ms=0.75, live_after_commit_ms=1.0, repair_off_ms=0.125,
              live_at_unix_ms=1700000000000.5, announcements=3,
              dropped=dict(syn=1, ingress=2, egress=0), resident_kib=4096, peak_resident_kib=8192)
source_side = (
    message(type="hello", protocol=3, token="secret")
    + message(type="prepare", service="198.18.0.100:8080", prefix_len=24,
              expected_connections=1000)
    + frame(1, seeds["three_mixed"][:40]) + frame(1, seeds["three_mixed"][40:])
    + message(type="commit", answer_within_ms=10000)
)
agent_side = (
    message(type="welcome", protocol=3) + message(type="prepared")
    + message(type="restored", connections=3, restore_ms=0.5) + message(type="going_live")
    + message(type="committed", report=report)
)
frames = {
    "hello": (0, message(type="hello", protocol=3, token="secret")),
    "refused": (0, message(type="refused", reason="wrong token")),
    "source_side": (1, source_side),
    "agent_side": (1, agent_side),
    "failures": (1, message(type="abort", reason="x") + message(type="failed", error="y")
                 + message(type="prepare", service="[fd54:636d::100]:443", prefix_len=64,
                         expected_connections=100)),
    "too_big": (0, struct.pack(">I", 1 << 20) + b"\0{"),
    "truncated": (1, message(type="prepared")[:-2]),
    "unknown_tag": (1, frame(7, b"?")),
}
os.makedirs("seeds/transport_frames", exist_ok=True)
for name, (limit, data) in frames.items():
    for chunk in (1, 7, 255):
        with open(f"seeds/transport_frames/{name}_{chunk}", "wb") as f:
            f.write(bytes([chunk, limit]) + data)
