"""The browser playground: a static page at ``/playground`` that drives the public API.

The page is plain HTML, CSS and ES modules shipped in ``static/``; it has no build step and
loads nothing from the network. It talks to ttalign only through ``/v1`` (models, strategies,
rewards, chat completions), so it sees exactly what any client sees, API key included.
"""

from ttalign.server.playground.routes import PLAYGROUND_PATH, install_playground

__all__ = ["PLAYGROUND_PATH", "install_playground"]
