"""`python -m runners.agent --scenario FILE --device NAME`: one device agent in its own process.

The runner starts one per device with `--processes` (and stops them); for runs across
several hosts, start them by hand on each host with the same scenario file and run token
and give the runner their addresses (docs/architecture.md, "Agents in processes and on
several hosts").

The agent listens on 127.0.0.1 (another address only with `--allow-remote`), prints
`READY <port>` on stdout once it listens, and then does what its runner asks over the
authenticated `/control` websocket: learn its peers and connect to them, apply scenario
events to itself and its outgoing links, report its state, relay the controller's
messages when it is the source device, and stop. The run token comes from the
environment variable TESTBED_RUN_TOKEN (never from the command line, where other users
could read it); without it the agent refuses to start.

Exit status: 0 stopped by its runner, SIGTERM or Ctrl-C; 2 bad input (no token, a bad
scenario or device, an address it may not listen on); 3 the port is in use or cannot be
bound. Every refusal is one line on stderr.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import sys

from testbed.emulation.clock import CLOCKS
from testbed.emulation.clock import run as run_loop
from testbed.harness.agent_server import device_spec, serve
from testbed.harness.control import TOKEN_ENV
from testbed.scenario import ScenarioError, load

EXIT_PORT = 3  # the address cannot be bound (port in use, or not ours)


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except KeyboardInterrupt:  # before the server runs (it handles SIGINT itself)
        print("interrupted", file=sys.stderr)
        return 0


def _main(argv: list[str] | None) -> int:
    p = argparse.ArgumentParser(prog="python -m runners.agent", description=__doc__.split("\n")[0])
    p.add_argument("--scenario", required=True, help="the run's scenario file")
    p.add_argument("--device", required=True, help="this agent's device name")
    p.add_argument("--seed", type=int, help="the run's seed (as given to the runner)")
    p.add_argument("--tokens", type=int, help="the run's --tokens (as given to the runner)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=0, help="port (default: any free one)")
    p.add_argument("--allow-remote", action="store_true",
                   help="allow listening on an address other than loopback (runs across hosts)")
    p.add_argument("--clock", choices=CLOCKS, default="real", help=argparse.SUPPRESS)
    p.add_argument("--links", choices=("emulated", "kernel"), default="emulated",
                   help="kernel: the runner shapes this agent's links in the kernel (runners.run --links kernel)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format=f"%(levelname)s {args.device}: %(message)s")
    token = os.environ.get(TOKEN_ENV, "")
    if len(token) < 16:
        print(f"error: set {TOKEN_ENV} to the run's token (at least 16 characters)", file=sys.stderr)
        return 2
    try:
        scen = load(args.scenario).with_overrides(seed=args.seed, new_tokens=args.tokens)
        device_spec(scen, args.device)
    except ScenarioError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyError:
        print(f"error: {args.scenario}: no device {args.device!r} (declared or joining)", file=sys.stderr)
        return 2
    try:
        run_loop(lambda: serve(scen, args.device, token, args.host, args.port, args.allow_remote,
                                   args.links == "kernel"), "real",
                 precise=args.links == "kernel")  # otherwise the agent computes early
    except ValueError as e:  # e.g. a non-loopback address without --allow-remote
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # binding the address failed
        why = "already in use" if e.errno == errno.EADDRINUSE else (e.strerror or str(e))
        print(f"error: --host {args.host} --port {args.port}: {why}", file=sys.stderr)
        return EXIT_PORT
    return 0


if __name__ == "__main__":
    sys.exit(main())
