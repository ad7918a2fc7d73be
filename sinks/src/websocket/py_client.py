"""An independent WebSocket client for the fanout tests, using Python's `websockets` library.

Run by `tests_python.rs`. Every stdout line is one JSON object: either a frame received from the
server, printed as received, or a report of this script, which has a "py_client" key (server
frames never do):

    {"py_client": "start", "websockets": "<version>"}
    {"py_client": "unknown_key", "status": 401}      # HTTP status of the refused handshake
    <frame> ...                                      # every frame received, in order
    {"py_client": "done", "reason": "count"|"timeout", "frames": <n>}

It first checks that `--bad-key` is refused, then connects with `--key`, subscribes to
`--channels`, prints frames until `--frames` have arrived (the `subscribed` ack included), keeps
printing whatever else arrives for `--linger` seconds, and exits 0. When `--timeout` seconds pass
first it reports "timeout" and exits 3. Works with the asyncio client of websockets >= 14
(`InvalidStatus`) and the legacy client of older versions (`InvalidStatusCode`).
"""

import argparse
import asyncio
import json
import sys
import urllib.parse
import warnings

import websockets
from websockets import exceptions as wse


def out(obj):
    print(json.dumps(obj, separators=(",", ":")), flush=True)


def with_key(url, key):
    return url + ("&" if "?" in url else "?") + urllib.parse.urlencode({"api_key": key})


def refused_status(exc):
    """The HTTP status of a refused handshake, or None if `exc` is not such a refusal."""
    with warnings.catch_warnings():
        # websockets 14+ deprecates (and may drop) the legacy InvalidStatusCode.
        warnings.simplefilter("ignore", DeprecationWarning)
        invalid_status = getattr(wse, "InvalidStatus", None)
        invalid_status_code = getattr(wse, "InvalidStatusCode", None)
    if invalid_status is not None and isinstance(exc, invalid_status):
        return exc.response.status_code
    if invalid_status_code is not None and isinstance(exc, invalid_status_code):
        return exc.status_code
    return None


async def check_unknown_key(url, key, open_timeout):
    try:
        async with websockets.connect(with_key(url, key), open_timeout=open_timeout):
            out({"py_client": "unknown_key", "status": None, "error": "handshake accepted"})
    except Exception as exc:  # noqa: BLE001 - anything else is reported, not raised
        status = refused_status(exc)
        if status is None:
            out({"py_client": "unknown_key", "status": None, "error": f"{type(exc).__name__}: {exc}"})
        else:
            out({"py_client": "unknown_key", "status": status})


async def receive(args, counter):
    async with websockets.connect(with_key(args.url, args.key), open_timeout=args.timeout) as ws:
        await ws.send(json.dumps({"type": "subscribe", "channels": args.channels}))
        while counter["frames"] < args.frames:
            out(json.loads(await ws.recv()))
            counter["frames"] += 1
        # Anything arriving after the expected frames is printed too, so the caller sees it.
        loop = asyncio.get_running_loop()
        until = loop.time() + args.linger
        while (left := until - loop.time()) > 0:
            try:
                frame = await asyncio.wait_for(ws.recv(), left)
            except asyncio.TimeoutError:
                break
            out(json.loads(frame))
            counter["frames"] += 1


async def main(args):
    out({"py_client": "start", "websockets": websockets.__version__})
    await check_unknown_key(args.url, args.bad_key, args.timeout)
    counter = {"frames": 0}
    try:
        await asyncio.wait_for(receive(args, counter), args.timeout)
    except asyncio.TimeoutError:
        out({"py_client": "done", "reason": "timeout", "frames": counter["frames"]})
        return 3
    out({"py_client": "done", "reason": "count", "frames": counter["frames"]})
    return 0


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", required=True, help="ws://host:port/ws")
    p.add_argument("--key", required=True)
    p.add_argument("--bad-key", required=True, help="a key the server must refuse with 401")
    p.add_argument("--channels", nargs="+", required=True)
    p.add_argument("--frames", type=int, required=True, help="frames to receive, the ack included")
    p.add_argument("--linger", type=float, default=0.5)
    p.add_argument("--timeout", type=float, default=20.0)
    sys.exit(asyncio.run(main(p.parse_args())))
