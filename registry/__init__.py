"""The model store: versions, lineage, content-addressed artifacts, channels and rollout.

Stdlib only, so the server and the CLI can import it without TensorFlow.
"""

from registry.channels import ChannelState, cohort_bucket
from registry.errors import InvalidInput, NotFound, PollinateError
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
]
