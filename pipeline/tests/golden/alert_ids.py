"""Computes the golden alert ids of pipeline/tests/golden.rs independently of the Rust code.

SPEC §2: alert_id is a deterministic hash of (rule_id, subject, triggered_at, the triggering
record's identity); docs/ARCHITECTURE.md ("alert_id") fixes it as the first 128 bits of
SHA-256 over the four fields, each prefixed by its length as a big-endian u64, triggered_at
being the event time in ms as a big-endian i64, with the record identities
price|<coin>|<ms>, tvl|<protocol>|<ms>, tvl|<protocol>|<chain>|<ms>, gas|<chain>|<ms>,
transfer|<chain>|<tx>|<coin>|<from>|<to>|<amount>, liquidation|<protocol>|<chain>|<account>|<amount>|<ms>
(amounts in the shortest form that reads back exactly, without a trailing ".0").

Run: python3 pipeline/tests/golden/alert_ids.py > pipeline/tests/golden/alert_ids.json
"""
import hashlib
import json
import struct

T0 = 1717430400  # seconds


def amount(x):
    s = repr(float(x))
    return s[:-2] if s.endswith(".0") else s


def alert_id(rule_id, subject, triggered_at_ms, identity):
    h = hashlib.sha256()
    for part in (rule_id.encode(), subject.encode(), struct.pack(">q", triggered_at_ms), identity.encode()):
        h.update(struct.pack(">Q", len(part)))
        h.update(part)
    return h.hexdigest()[:32]


ETH = "coingecko:ethereum"
t_cross = (T0 + 3600) * 1000
cases = [
    ("r-thr", ETH, t_cross, f"price|{ETH}|{t_cross}"),
    ("r-chg", ETH, t_cross, f"price|{ETH}|{t_cross}"),
    ("r-tvl", "2269", t_cross, f"tvl|2269|{t_cross}"),
    ("r-tvlc", "2269", t_cross, f"tvl|2269|ethereum|{t_cross}"),
    ("r-gas", "ethereum", (T0 + 60) * 1000, f"gas|ethereum|{(T0 + 60) * 1000}"),
    ("r-whale", ETH, (T0 + 3700) * 1000, f"transfer|ethereum|0xab|{ETH}|0x1|0x2|{amount(1250.5)}"),
    ("r-liq", "2269", (T0 + 10) * 1000, f"liquidation|2269|ethereum|0xdead|{amount(1500000.25)}|{(T0 + 10) * 1000}"),
]
print(json.dumps([
    {"rule_id": r, "subject": s, "triggered_at": t // 1000, "alert_id": alert_id(r, s, t, i)}
    for (r, s, t, i) in cases
], indent=1))
