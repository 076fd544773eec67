"""The model store: versions, lineage, content-addressed artifacts, channels and rollout.

Stdlib only, so the server and the CLI can import it without TensorFlow.
"""

from core.errors import InvalidInput, NotFound, PollinateError
from registry.channels import ChannelState, cohort_bucket
from registry.store import ArtifactFile, Lineage, Store, VersionRecord

__all__ = [
    "ArtifactFile",
    "ChannelState",
    "InvalidInput",
    "Lineage",
    "NotFound",
    "PollinateError",
    "Store",
    "VersionRecord",
    "cohort_bucket",
    "open_store",
]


def open_store(home) -> Store:
    """The store at `home` (created on first use); what every room's CLI opens."""
    return Store(home)
