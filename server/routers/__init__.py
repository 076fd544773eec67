"""One APIRouter per resource (FastAPI's "bigger applications" layout)."""
