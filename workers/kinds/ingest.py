"""Runs `ingest` (spec: app/kinds/ingest.py): parses a large upload into its dataset's
normalised copy with the same code an upload small enough is parsed with in the request
(app.stores.datasets.parse_stored), then the dataset is ready, or failed with the one
sentence a 4xx would have carried (the job fails with it too). Safe to re-run after a crash:
the outputs are renamed into place and the dataset row changes in one commit."""

from __future__ import annotations

from app.ingest import IngestError
from app.kinds import Spec
from app.stores import datasets as datasets_store
from workers.kinds import JobResult
from workers.runtime import JobCancelled, JobContext, JobLost


def run(ctx: JobContext, spec: Spec) -> JobResult:
    dataset_id = spec["dataset_id"]
    ctx.progress(0.0, f"parsing dataset {dataset_id}", force=True)

    def progress(fraction: float | None, rows: int) -> None:
        ctx.check_cancel()
        ctx.progress(fraction or 0.0, f"{rows:,} rows read")

    with ctx.db.session() as s:
        try:
            ds = datasets_store.parse_stored(s, ctx.settings, ctx.tenant_id, dataset_id, progress)
        except IngestError as exc:
            raise ValueError(exc.message) from None  # the dataset is failed with the same sentence
        except JobLost:
            raise  # the attempt that took over finishes the dataset
        except JobCancelled:
            datasets_store.mark_failed(s, ctx.tenant_id, dataset_id, "its ingest job was cancelled")
            raise
        except Exception as exc:
            why = f"the upload could not be parsed ({type(exc).__name__})"
            datasets_store.mark_failed(s, ctx.tenant_id, dataset_id, why)
            raise
        result = {"dataset_id": ds.id, "status": ds.status.value, "rows": ds.rows, "invalid_rows": ds.invalid_rows}
    ctx.progress(1.0, f"dataset {dataset_id} is {result['status']}: {result['rows']:,} rows", force=True)
    return result
