"""Computes the golden route hashes of operators/tests/route_hash.rs independently of the Rust
code.

A record's key picks its worker (`hash % workers`) and rule routes are kept in checkpoints, so
the hash is a contract: docs/ARCHITECTURE.md ("Routing") fixes it as 64-bit FNV-1a over one
tag byte (1 coin, 2 protocol, 3 chain) followed by the key's UTF-8 bytes, then splitmix64's
finalizer.

Run: python3 operators/tests/golden/route_hashes.py > operators/tests/golden/route_hashes.json
"""
import json

MASK = (1 << 64) - 1


def fnv1a(data):
    h = 0xCBF29CE484222325
    for b in data:
        h ^= b
        h = (h * 0x100000001B3) & MASK
    return h


def mix(z):
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
    return z ^ (z >> 31)


def route(tag, key):
    return mix(fnv1a(bytes([tag]) + key.encode("utf-8")))


KEYS = [
    ("coin", 1, "coingecko:ethereum"),
    ("coin", 1, "coingecko:bitcoin"),
    ("coin", 1, "ethereum:0xa0b86991c6218b36c1d19d4a2e9eb0ce3606eb48"),
    ("coin", 1, ""),
    ("coin", 1, "coingecko:ünïcødé-€"),
    ("protocol", 2, "2269"),
    ("protocol", 2, "1"),
    ("protocol", 2, "aave-v3"),
    ("chain", 3, "ethereum"),
    ("chain", 3, "arbitrum"),
    ("chain", 3, "Binance"),
]

rows = []
for kind, tag, key in KEYS:
    h = route(tag, key)
    # As strings: JSON numbers lose precision beyond 2^53.
    rows.append({"kind": kind, "key": key, "hash": str(h), "workers": {str(w): h % w for w in (2, 3, 4, 8)}})
print(json.dumps(rows, indent=1, ensure_ascii=False))
