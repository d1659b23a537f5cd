"""``python -m jaxpaged.serve``: the OpenAI-compatible HTTP server (see ``jaxpaged.server``)."""

from jaxpaged.server.api_server import main

if __name__ == "__main__":
    main()
