#!/usr/bin/env python3
"""Writes the seed corpus of each fuzz target (tests/fuzz/corpus/<target>/seed-*).

Run from anywhere: python3 tests/fuzz/make_seeds.py. Frames are laid out as
src/proto/frame.rs encodes them (CRC-32/IEEE is zlib.crc32); WAL seeds are
the first pages of the real fixtures in fixtures/pg15.
"""
import gzip
import os
import struct
import zlib

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.normpath(os.path.join(HERE, "..", ".."))
SECRET = b"fuzzing-shared-secret-0123456789"


def frame(body):
    return struct.pack("<I", len(body)) + body + struct.pack("<I", zlib.crc32(body))


PROTOCOL_VERSION = 2

BODIES = {
    "client_hello": b"\x01" + struct.pack("<H", PROTOCOL_VERSION) + bytes(range(32)),
    "server_challenge": b"\x02" + struct.pack("<H", PROTOCOL_VERSION) + bytes(range(32)) + bytes(32),
    "client_proof": b"\x03" + bytes([7]) * 32,
    "hello": b"\x04" + struct.pack("<QIIIQ", 7300000000000000001, 1, 16 << 20, 150018, 0x1000028),
    "welcome_none": b"\x05" + bytes(13),
    "welcome": b"\x05\x01" + struct.pack("<IQ", 1, 0x3000000),
    "refuse": b"\x06\x02fenced: a failover ended this spool",
    "data": b"\x07" + struct.pack("<IQ", 1, 0x1000028) + bytes(range(64)),
    "ack": b"\x08" + struct.pack("<IQ", 1, 0x1000100),
    "heartbeat": b"\x09" + struct.pack("<QQ", 5, 1700000000000000),
    "history": b"\x0a" + struct.pack("<I", 2) + b"1\t0/3000000\tno recovery target specified\n",
}


def write(target, name, data):
    d = os.path.join(HERE, "corpus", target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "seed-" + name), "wb") as f:
        f.write(data)


def fixture(kind, name):
    with gzip.open(os.path.join(ROOT, "fixtures", "pg15", kind, name + ".gz")) as f:
        return f.read()


# frame_decode: mode | chunk | bytes
stream = b"".join(frame(b) for b in BODIES.values())
write("frame_decode", "stream", b"\x00\x07" + stream)
write("frame_decode", "stream-small-max", b"\x02\x40" + stream)
write("frame_decode", "bodies", b"\x01\x03" + b"\xfe\xfe".join(BODIES.values()))
for k in ("hello", "data", "welcome"):
    write("frame_decode", k, b"\x00\x40" + frame(BODIES[k]))

# handshake: mode | chunk | bytes
write("handshake", "server", b"\x00\x05" + frame(BODIES["client_hello"]) + frame(BODIES["client_proof"]))
write("handshake", "client", b"\x01\x05" + frame(BODIES["server_challenge"]))
write("handshake", "server-bodies", b"\x02\x40" + BODIES["client_hello"] + b"\xfe\xfe" + BODIES["client_proof"])
write("handshake", "server-refused", b"\x00\x40" + frame(BODIES["refuse"]))
write("handshake", "duplex-right", b"\x03\x10" + SECRET)
write("handshake", "duplex-wrong", b"\x03\x10" + SECRET[:-1] + b"!")

# wal_page: cfg[4] | pages. cfg: segment size 1 MB, page number, flags.
segs = {
    "fpi": ("fpi", "000000010000000000000007", 7),
    "span-pages": ("span-pages", "000000010000000000000008", 8),
    "switch": ("switch", "000000010000000000000006", 6),
}
for tag, (kind, name, segno) in segs.items():
    b = fixture(kind, name)
    page = segno * 128  # 1 MB segments of 8 kB pages
    write("wal_page", tag, b"\x00" + struct.pack("<H", page) + b"\x00" + b[:16384])
    # wal_scan even mode: mode | page[2] | bytes
    write("wal_scan", tag, b"\x00" + struct.pack("<H", page) + b[:24576])
b = fixture("span-pages", "000000010000000000000008")
write("wal_page", "second-page", b"\x00" + struct.pack("<H", 8 * 128 + 1) + b"\x03" + b[8192:16384])
write("wal_page", "sysid-maxtli", b"\x00" + struct.pack("<H", 8 * 128) + b"\x07" + b[:8192])
# wal_scan odd mode: mode | fixture | cut[3] | (offset[3] xor)*
write("wal_scan", "mutate-whole", b"\x01\x00\x00\x00\x00")
write("wal_scan", "mutate-cut", b"\x01\x02\x00\x40\x00" + b"\x10\x00\x00\x01")
write("wal_scan", "mutate-anywhere", b"\x03\x04\x00\x00\x00" + b"\x00\x20\x00\x80" + b"\x30\x01\x00\x04")

# wal_names: size | text
for i, text in enumerate([
    b"\x04000000010000000000000003",
    b"\x04000000010000000000000003.partial",
    b"\x0000000002.history",
    b"\x04000000010000000000000003.00000028.backup",
    b"\x001\t0/3000158\tno recovery target specified\n\n# c\n2\t0/5000000\tat restore point\n",
    b"\x0016/B374D848",
]):
    write("wal_names", "n%d" % i, text)
