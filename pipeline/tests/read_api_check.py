"""An independent client of llamaflow's read API (SPEC §8), using only Python's standard library.

Usage: read_api_check.py PORT API_KEY

Fetches every path of SPEC §8, checks the response shapes, status codes and the
x-llamaflow-as-of header, and prints one JSON object with what it read (for the Rust test to
compare with its own expectations). Exits non-zero with a message on the first violation.
"""

import json
import sys
import urllib.error
import urllib.request

PORT = int(sys.argv[1])
KEY = sys.argv[2]
BASE = f"http://127.0.0.1:{PORT}"


def get(path, headers=None):
    req = urllib.request.Request(BASE + path, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            body, code, hdrs = r.read(), r.status, r.headers
    except urllib.error.HTTPError as e:
        body, code, hdrs = e.read(), e.code, e.headers
    assert hdrs.get("content-type", "").startswith("application/json"), (path, hdrs.get("content-type"))
    as_of = hdrs.get("x-llamaflow-as-of")
    assert as_of is not None and as_of.isdigit(), (path, "x-llamaflow-as-of", as_of)
    return code, json.loads(body), int(as_of)


def is_num(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def num_or_null(v):
    return v is None or is_num(v)


def check_keys(obj, keys, where):
    assert isinstance(obj, dict), (where, obj)
    missing = [k for k in keys if k not in obj]
    assert not missing, (where, "missing", missing, obj)


def check_points(points, field, where):
    assert isinstance(points, list), (where, points)
    dates = []
    for p in points:
        check_keys(p, ["date", field], where)
        assert isinstance(p["date"], int), (where, p)
        assert is_num(p[field]), (where, p)
        dates.append(p["date"])
    assert dates == sorted(dates) and len(set(dates)) == len(dates), (where, "dates ascending, unique", dates)


out = {}

code, chains, _ = get("/v2/chains")
assert code == 200, code
for c in chains:
    check_keys(c, ["name", "tvl", "gecko_id", "tokenSymbol", "chainId"], "/v2/chains")
    assert isinstance(c["name"], str) and is_num(c["tvl"]), c
    assert c["gecko_id"] is None or isinstance(c["gecko_id"], str), c
    assert c["chainId"] is None or isinstance(c["chainId"], int), c
tvls = [c["tvl"] for c in chains]
assert tvls == sorted(tvls, reverse=True), ("/v2/chains by tvl descending", tvls)
out["chains"] = {c["name"]: c["tvl"] for c in chains}
out["chain_meta"] = {c["name"]: [c["gecko_id"], c["tokenSymbol"], c["chainId"]] for c in chains}
code, legacy, _ = get("/chains")
assert code == 200 and {c["name"] for c in legacy} == set(out["chains"]), legacy

code, cats, _ = get("/categories")
assert code == 200, code
for c in cats:
    check_keys(c, ["category", "tvl", "protocols", "change_1d", "change_7d"], "/categories")
    assert is_num(c["tvl"]) and isinstance(c["protocols"], int), c
    assert num_or_null(c["change_1d"]) and num_or_null(c["change_7d"]), c
out["categories"] = {str(c["category"]): [c["tvl"], c["protocols"]] for c in cats}

code, protocols, _ = get("/protocols")
assert code == 200, code
for p in protocols:
    check_keys(
        p,
        ["id", "name", "symbol", "slug", "category", "chains", "tvl", "chainTvls", "change_1h", "change_1d", "change_7d"],
        "/protocols",
    )
    assert isinstance(p["chains"], list) and isinstance(p["chainTvls"], dict), p
    assert is_num(p["tvl"]), p
    assert abs(sum(p["chainTvls"].values()) - p["tvl"]) <= 1e-6 * max(1.0, p["tvl"]), ("tvl = Σ chainTvls", p)
tvls = [p["tvl"] for p in protocols]
assert tvls == sorted(tvls, reverse=True), ("/protocols by tvl descending", tvls)
out["protocols"] = {p["id"]: {"tvl": p["tvl"], "category": p["category"], "name": p["name"], "slug": p["slug"],
                              "symbol": p["symbol"], "chainTvls": p["chainTvls"]} for p in protocols}

# Each protocol with a slug: /protocol/{slug} and /tvl/{slug}.
out["protocol_pages"] = {}
for p in protocols:
    if not p["slug"]:
        continue
    code, page, _ = get(f"/protocol/{p['slug']}")
    assert code == 200, (p["slug"], code, page)
    check_keys(page, ["id", "name", "symbol", "category", "chains", "currentChainTvls", "tvl", "chainTvls"], "/protocol")
    check_points(page["tvl"], "totalLiquidityUSD", f"/protocol/{p['slug']} tvl")
    for chain, series in page["chainTvls"].items():
        check_keys(series, ["tvl"], f"/protocol chainTvls.{chain}")
        check_points(series["tvl"], "totalLiquidityUSD", f"/protocol chainTvls.{chain}")
    if page["tvl"]:
        assert page["tvl"][-1]["totalLiquidityUSD"] == p["tvl"], ("last hourly point = current tvl", page["tvl"][-1], p)
    code, bare, _ = get(f"/tvl/{p['slug']}")
    assert code == 200 and is_num(bare) and bare == p["tvl"], (p["slug"], bare, p["tvl"])
    out["protocol_pages"][p["slug"]] = {"points": len(page["tvl"]), "current": page["currentChainTvls"]}

code, hist, _ = get("/v2/historicalChainTvl")
assert code == 200, code
check_points(hist, "tvl", "/v2/historicalChainTvl")
out["total_history"] = hist
code, charts, _ = get("/charts")
assert code == 200 and [[p["date"], p["totalLiquidityUSD"]] for p in charts] == [[p["date"], p["tvl"]] for p in hist], charts
out["chain_history"] = {}
for c in chains:
    code, h, _ = get(f"/v2/historicalChainTvl/{urllib.request.quote(c['name'])}")
    assert code == 200, (c["name"], code, h)
    check_points(h, "tvl", f"/v2/historicalChainTvl/{c['name']}")
    assert h and h[-1]["tvl"] == c["tvl"], ("the last daily point is the current value", c, h[-1:])
    code, h2, _ = get(f"/charts/{urllib.request.quote(c['name'])}")
    assert code == 200 and [p["totalLiquidityUSD"] for p in h2] == [p["tvl"] for p in h], (c, h2)
    out["chain_history"][c["name"]] = h

# Errors: unknown slug / chain → 404 {"error"}, malformed → 400, never 500.
for path, want in [
    ("/protocol/no-such-protocol", 404),
    ("/tvl/no-such-protocol", 404),
    ("/v2/historicalChainTvl/nochain", 404),
    ("/charts/nochain", 404),
    ("/prices/current/notacoin", 400),
    ("/prices/current/,", 400),
    ("/prices/current/" + ",".join(f"coingecko:c{i}" for i in range(501)), 400),
    ("/alerts/recent", 401),
    ("/alerts/recent?api_key=wrong", 401),
]:
    code, body, _ = get(path)
    assert code == want, (path, code, body)
    assert isinstance(body, dict) and isinstance(body.get("error"), str), (path, body)

code, prices, _ = get("/prices/current/coingecko:ethereum,coingecko:unknown-coin")
assert code == 200, code
check_keys(prices, ["coins"], "/prices/current")
assert "coingecko:unknown-coin" not in prices["coins"], prices
for coin, p in prices["coins"].items():
    check_keys(p, ["price", "symbol", "timestamp", "confidence"], "/prices/current")
    assert is_num(p["price"]) and is_num(p["timestamp"]), p
out["prices"] = prices["coins"]

code, alerts, _ = get("/alerts/recent", {"x-api-key": KEY})
assert code == 200 and isinstance(alerts, list) and len(alerts) <= 100, (code, alerts)
times = [a["triggered_at"] for a in alerts]
assert times == sorted(times, reverse=True), ("newest first", times)
code, alerts2, _ = get(f"/alerts/recent?api_key={KEY}")
assert code == 200 and alerts2 == alerts, alerts2
out["alerts"] = [[a["alert_id"], a["user_id"]] for a in alerts]

print(json.dumps(out))
