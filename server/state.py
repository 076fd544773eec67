"""What every route of one process shares: the config, the store and its caches.

Built once per process by :func:`server.app.create_app` and kept on ``app.state``;
routes reach it through the :func:`services` dependency.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request

from registry import Store
from server.blobs import BlobStore
from server.catalog import Catalog
from server.config import ServerConfig


@dataclass(frozen=True)
class Services:
    config: ServerConfig
    store: Store
    catalog: Catalog
    blobs: BlobStore

    @classmethod
    def build(cls, config: ServerConfig) -> Services:
        store = Store(config.home)
        return cls(config, store, Catalog(store), BlobStore(config.offload))


async def services(request: Request) -> Services:
    # async: FastAPI runs a plain `def` dependency in its thread pool, a hop on every request
    return request.app.state.services


ServicesDep = Annotated[Services, Depends(services)]
