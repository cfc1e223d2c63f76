"""``python -m bridge call``: place an outbound call that a running bridge server will answer.

Twilio dials ``--to`` from ``--from`` and, once answered, fetches ``<public URL>/outbound-twiml``
from the server, which connects the call to the agent; progress events go to ``/call-status``.
Unless ``AMD=off`` (or ``--no-amd``), the call asks for asynchronous answering-machine detection,
whose result Twilio POSTs to ``/amd-status``: the agent's first words wait for it there.
``TWILIO_REGION`` / ``TWILIO_EDGE`` / ``TWILIO_API_BASE`` choose the REST endpoint.
This command only talks to Twilio's REST API: it needs the Twilio credentials and the public URL,
not the AssemblyAI key, and never imports the web server.

Every failure is one line on stderr naming what to fix; exit status 1 (2 for a bad command line).
The auth token is never printed.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping, Sequence
from typing import NoReturn

import trio

from bridge.config import EnvReader, check_e164, load_environment, mask, parse_public_base, parse_twilio_api
from bridge.errors import ConfigError, TwilioRestError
from bridge.phone.rest import DEFAULT_STATUS_EVENTS, TrioHttpClient, TwilioRest

PROG = "python -m bridge call"
EXAMPLE_NUMBER = "+14155550123"

# Twilio codes whose message does not say what to change on our side.
_HINTS = {
    20003: "check TWILIO_ACCOUNT_SID and TWILIO_AUTH_TOKEN (Twilio console > Account info)",
    20404: "check TWILIO_ACCOUNT_SID (Twilio console > Account info)",
    21210: "use a number of this account (or a verified caller ID) as --from / TWILIO_PHONE_NUMBER",
    21212: "use a Twilio number of this account as --from / TWILIO_PHONE_NUMBER",
    21219: "trial accounts can only call verified numbers (Twilio console > Verified Caller IDs)",
}


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One line instead of argparse's usage block, as for every other failure.
        raise _UsageError(f"{self.prog}: {message} (see {self.prog} --help)")


def _parser() -> _Parser:
    parser = _Parser(
        prog=PROG,
        description="Place an outbound call through Twilio; the running bridge answers it.",
    )
    parser.add_argument(
        "--to",
        metavar="NUMBER",
        help="E.164 number to call (default: TARGET_PHONE_NUMBER)",
    )
    parser.add_argument(
        "--from",
        dest="from_",
        metavar="NUMBER",
        help="your Twilio number, E.164 (default: TWILIO_PHONE_NUMBER)",
    )
    parser.add_argument(
        "--no-amd",
        dest="amd",
        action="store_false",
        default=None,
        help="do not ask Twilio for answering-machine detection (default: AMD, on)",
    )
    return parser


def main(
    argv: Sequence[str] | None = None,
    environ: Mapping[str, str] | None = None,
    *,
    http_client: TrioHttpClient | None = None,
) -> int:
    """Run the ``call`` command and return the exit status (0, 1, or 2 for usage errors).

    Args:
        argv: the arguments after ``call`` (default: ``sys.argv[1:]``, right for
            ``python -m bridge.phone.outbound``; ``python -m bridge call`` must pass ``sys.argv[2:]``).
        environ: the variables to use (default: ``os.environ`` over an optional ``.env``).
        http_client: the HTTP client for Twilio (tests point it at a fake API); this command
            takes ownership of it and closes it once the call was attempted.

    Starts its own ``trio.run``, so it must not be called from inside a Trio run's thread.
    """
    try:
        args = _parser().parse_args(argv)
    except _UsageError as exc:
        print(exc, file=sys.stderr)
        return 2
    except SystemExit as exc:  # --help
        return exc.code if isinstance(exc.code, int) else 0
    env = load_environment(os.environ) if environ is None else dict(environ)
    token = (env.get("TWILIO_AUTH_TOKEN") or "").strip()

    try:
        to = _number("--to", args.to, env, "TARGET_PHONE_NUMBER")
        from_ = _number("--from", args.from_, env, "TWILIO_PHONE_NUMBER")
    except _UsageError as exc:
        return _fail(str(exc), token, 2)
    except ConfigError as exc:
        return _fail(str(exc), token, 1)
    try:
        reader = EnvReader(env)
        account_sid = reader.account_sid("TWILIO_ACCOUNT_SID") or reader.required(
            "TWILIO_ACCOUNT_SID", "copy it from the Twilio console and set TWILIO_ACCOUNT_SID=AC..."
        )
        token = reader.required(
            "TWILIO_AUTH_TOKEN", "copy it from the Twilio console and set TWILIO_AUTH_TOKEN=..."
        )
        public, public_warning = parse_public_base(env)
        api = parse_twilio_api(reader)
        amd = reader.boolean("AMD", True) if args.amd is None else args.amd
    except ConfigError as exc:
        return _fail(str(exc), token, 1)
    if public_warning:
        # Twilio could not fetch the TwiML: the callee's phone would ring into an error message.
        return _fail(public_warning, token, 1)

    rest = TwilioRest(account_sid, token, http_client=http_client, api=api)
    try:
        sid = trio.run(
            _place,
            rest,
            to,
            from_,
            public.http_url("/outbound-twiml"),
            public.http_url("/call-status"),
            public.http_url("/amd-status") if amd else None,
        )
    except TwilioRestError as exc:
        return _fail(_describe(exc), token, 1)
    except KeyboardInterrupt:
        return _fail(
            "Interrupted before Twilio answered: the call may still be placed.", token, 130
        )
    print(f"Calling {to} from {from_}: {sid}")
    return 0


async def _place(
    rest: TwilioRest, to: str, from_: str, url: str, status_callback: str, amd_callback: str | None
) -> str:
    async with rest:
        return await rest.place_call(
            to=to,
            from_=from_,
            url=url,
            status_callback=status_callback,
            status_callback_events=DEFAULT_STATUS_EVENTS,
            amd_status_callback=amd_callback,
        )


def _number(flag: str, value: str | None, env: Mapping[str, str], variable: str) -> str:
    if value is not None:
        number = value.strip()
        try:
            return check_e164(flag, number)
        except ConfigError as exc:
            raise _UsageError(str(exc)) from None
    found = EnvReader(env).e164(variable)
    if found is None:
        example = EXAMPLE_NUMBER
        raise ConfigError(
            f"{variable} is not set: pass {flag} {example} or set {variable}={example}"
        )
    return found


def _describe(exc: TwilioRestError) -> str:
    if exc.code is not None:
        hint = _HINTS.get(exc.code)
        return f"{exc}" + (f" ({hint})" if hint else "")
    if exc.status == 0:
        return f"Could not reach Twilio: {exc.message}"
    return f"Twilio answered HTTP {exc.status}: {exc.message}"


def _fail(line: str, token: str, status: int) -> int:
    if token:
        line = line.replace(token, mask(token))
    print(" ".join(line.split()), file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
