"""Registers the marketplace routes (jobs, tasks, planned tasks, payments, buckets, files, automations)
and the background loops (planned-task assignment, temporary-file expiry)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

from aiohttp import web

from proxyorch.tasks import TaskSet

from . import applicants, assignment, automations, buckets, files, jobs, payments, planned, storage, tasks
from .context import POOL, SETTINGS


async def _loops(app: web.Application) -> AsyncIterator[None]:
    """The background loops, owned for the app's lifetime and cancelled at cleanup."""
    settings, pool = app[SETTINGS], app[POOL]
    temp_dir = Path(settings.data_dir).resolve() / "files" / "temp"
    temp_dir.mkdir(parents=True, exist_ok=True)
    loops = TaskSet("marketplace loops")
    loops.spawn(assignment.sweeper(pool, settings.assign_sweep_interval_s), name="assignment sweeper")
    loops.spawn(files.sweeper(pool, temp_dir), name="temp file sweeper")
    yield
    await loops.close()


def setup(app: web.Application) -> None:
    r = app.router
    r.add_post("/api/v2/jobs/applicants", applicants.list_applicants)
    r.add_put("/api/v2/jobs/applicants", applicants.update_applicants)
    r.add_get("/api/v2/jobs/details", jobs.job_details)
    r.add_post("/api/v2/jobs/check-uniquenes", jobs.check_uniqueness)
    r.add_post("/api/v2/jobs/myjobs", jobs.my_jobs)
    r.add_get("/api/v2/jobs", jobs.list_jobs)
    r.add_post("/api/v2/jobs/submit", jobs.submit_job)
    r.add_put("/api/v2/jobs/update-status", jobs.update_status)
    r.add_get("/api/v2/jobs/{job_id}/buckets", buckets.list_buckets)
    r.add_delete("/api/v2/jobs/{job_id}/buckets", buckets.wipe_buckets)
    r.add_get("/api/v2/jobs/{job_id}/buckets/{device_id}", buckets.get_bucket)
    r.add_put("/api/v2/jobs/{job_id}/buckets/{device_id}", buckets.put_bucket)
    r.add_delete("/api/v2/jobs/{job_id}/buckets/{device_id}", buckets.delete_bucket)

    r.add_get("/api/v2/tasks/apply", tasks.apply)
    r.add_post("/api/v2/tasks/details", tasks.details)
    r.add_post("/api/v2/tasks/submit", tasks.submit)
    r.add_get("/api/v2/tasks/planned", planned.list_planned)
    r.add_post("/api/v2/tasks/planned", planned.submit_planned)
    r.add_delete("/api/v2/tasks/planned", planned.delete_planned)
    r.add_delete("/api/v2/tasks/delete", tasks.delete_task)
    r.add_post("/api/v2/tasks/reinitiate", tasks.reinitiate)

    r.add_post("/api/v2/payments/withdraw", payments.withdraw)
    r.add_get("/api/v2/payments/withdrawals", payments.withdrawals)
    r.add_get("/api/v2/user/balance", payments.balance)

    r.add_post("/api/v2/device-bucket/read", buckets.read_device_bucket)
    r.add_post("/api/v2/device-bucket/merge", buckets.merge_device_bucket)
    r.add_post("/api/v2/files/upload", files.upload)
    r.add_get("/api/v2/files/temp/{filename}", files.fetch_temp)
    r.add_get("/api/v2/files/proof/{filename}", storage.serve_proof_file)

    r.add_post("/api/v2/admin/automations", automations.create_automation)
    r.add_get("/api/v2/admin/automations", automations.list_automations)
    r.add_post("/api/v2/admin/deposits", payments.admin_deposit)
    app.cleanup_ctx.append(_loops)
