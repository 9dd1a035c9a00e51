#!/usr/bin/env python3
"""Writes the seed corpus of the image_decode target: small valid images in the format that
migrate-user/src/image/mod.rs documents (big-endian, CRC-32 per record). Each seed starts with
the target's chunk-size byte. Run from this directory: python3 make_seeds.py"""
import ipaddress, os, struct, zlib

def record(kind, body):
    head = struct.pack(">IB", 4 + 1 + len(body) + 4, kind) + body
    return head + struct.pack(">I", zlib.crc32(head))

def connection(local, lport, remote, rport, send=b"", unsent=0, recv=b"", flags=0b1111):
    la, ra = ipaddress.ip_address(local), ipaddress.ip_address(remote)
    v6 = la.version == 6
    body = struct.pack(">HBB", flags | (1 if v6 else 0), 1, 7 | (9 << 4))
    body += la.packed + struct.pack(">H", lport) + ra.packed + struct.pack(">H", rport)
    body += struct.pack(">II", 0xDEADBEEF, 7) + struct.pack(">5I", 1, 2, 3, 4, 5)
    body += struct.pack(">HI", 1448, 123456) + struct.pack(">HHB", 60, 5, 3)
    body += struct.pack(">IIIIB", 30000, 87040, 131072, 0xC114, 0x10)
    body += struct.pack(">III", len(send), unsent, len(recv)) + send + recv
    return record(1, body)

def image(conns):
    return b"TCPMIGIM" + struct.pack(">HH", 1, 0) + b"".join(conns) + record(2, struct.pack(">I", len(conns)))

seeds = {
    "empty": image([]),
    "one_v4_idle": image([connection("198.18.0.100", 80, "198.18.0.1", 40000)]),
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
