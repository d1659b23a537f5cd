"""``python -m jaxpaged.worker``: a process other than 0 of a multi-host engine (jaxpaged/distributed.py).

Takes the engine arguments the leader was given (same model, ``--tensor-parallel-size``,
``--coordinator-address``, ``--num-processes``) and its own ``--process-id``; builds its share of
the engine and replays the leader's steps until the leader stops. The leader is an ``LLM`` /
``LLMEngine`` built in process 0, or ``python -m jaxpaged.serve`` there (which also turns into
this loop when started with a process id other than 0)."""

from __future__ import annotations

import argparse
import logging

from jaxpaged.engine_args import EngineArgs


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    EngineArgs.add_cli_args(parser)
    parser.add_argument("--log-level", default="info")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        engine_args = EngineArgs.from_cli_args(args)
    except ValueError as exc:
        raise SystemExit(f"error: {exc}") from exc

    from jaxpaged.llm_engine import LLMEngine  # heavy import (JAX) only once arguments are valid

    LLMEngine.from_engine_args(engine_args).serve_worker()


if __name__ == "__main__":
    main()
