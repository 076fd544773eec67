"""The distribution service: a small FastAPI app that serves every stored version.

Browser apps, mobile apps and federated clients ask it which version to run (a channel's
manifest), then download that version's files. Files are immutable and content-addressed,
so they are cached forever; manifests are revalidated cheaply with strong ETags.

The server only reads the store (``registry``) except for the two admin routes that move
channels. It never imports TensorFlow, so it starts in well under a second.

Entry points: :func:`server.run` (serve a store until interrupted: what ``pollinate serve``
and ``pollinate demo`` call), :func:`server.app.create_app` (tests, embedding) and
``server.app:app_from_env`` (uvicorn's factory, used when ``pollinate serve`` runs several workers).
"""

from server.serving import Listening, run

__all__ = ["Listening", "run"]
