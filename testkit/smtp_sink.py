"""An SMTP server for tests (aiosmtpd): parses every accepted mail with Python's email package
and appends it as one JSON line to the output file.

Usage: smtp_sink.py PORT OUT_FILE [USER PASSWORD [CERT KEY]]
With CERT and KEY, STARTTLS is offered and required (AUTH only after it).
Recipients at @bounce.example are refused for good (550); those at @flaky.example are refused
for now (451) on their first try, then accepted.
"""
import asyncio
import email
import json
import logging
import sys
import warnings
from email import policy

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword

warnings.filterwarnings("ignore")
logging.getLogger("mail.log").setLevel(logging.CRITICAL)

port, out = int(sys.argv[1]), sys.argv[2]
user, password = (sys.argv[3], sys.argv[4]) if len(sys.argv) > 4 else (None, None)
cert, key = (sys.argv[5], sys.argv[6]) if len(sys.argv) > 6 else (None, None)
tries = {}


class Handler:
    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        if address.endswith("@bounce.example"):
            return "550 5.1.1 mailbox unavailable"
        if address.endswith("@flaky.example"):
            tries[address] = tries.get(address, 0) + 1
            if tries[address] == 1:
                return "451 4.3.0 try again later"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):
        msg = email.message_from_bytes(envelope.content, policy=policy.default)
        text = msg.get_body(("plain",))
        html = msg.get_body(("html",))
        rec = {
            "from": envelope.mail_from,
            "to": envelope.rcpt_tos,
            "header_from": str(msg["from"]),
            "subject": str(msg["subject"]),
            "message_id": str(msg["message-id"]),
            # SMTP bodies travel with CRLF line ends; the parsed text uses \n.
            "text": text.get_content().replace("\r\n", "\n") if text is not None else None,
            "html": html.get_content().replace("\r\n", "\n") if html is not None else None,
            "authenticated": bool(session.authenticated),
            "tls": session.ssl is not None,
        }
        with open(out, "a") as f:
            f.write(json.dumps(rec) + "\n")
        return "250 Message accepted"


def authenticator(server, session, envelope, mechanism, auth_data):
    ok = (
        isinstance(auth_data, LoginPassword)
        and auth_data.login.decode() == user
        and auth_data.password.decode() == password
    )
    return AuthResult(success=ok)


kwargs = {}
if user:
    kwargs = dict(authenticator=authenticator, auth_require_tls=cert is not None, auth_required=True)
if cert:
    import ssl

    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    kwargs.update(tls_context=context, require_starttls=True)
controller = Controller(Handler(), hostname="127.0.0.1", port=port, **kwargs)
controller.start()
print("ready", flush=True)
try:
    asyncio.get_event_loop().run_until_complete(asyncio.Event().wait())
except KeyboardInterrupt:
    pass
