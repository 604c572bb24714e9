-- Automation agent surface (seed 004): the automation's own status of a job task, delivery of
-- task assignments to devices over their tunnels, and the registry of sub-tasks an agent created.

-- What the automation last reported through submitTask (running / success / failed / declined).
ALTER TABLE job_tasks ADD COLUMN IF NOT EXISTS automation_status text;
-- When the task_assigned message (with an agent token) reached the device; NULL = still to deliver.
ALTER TABLE job_tasks ADD COLUMN IF NOT EXISTS delivered_at timestamptz;
CREATE INDEX IF NOT EXISTS job_tasks_undelivered ON job_tasks(remote_device_id)
    WHERE status = 'running' AND delivered_at IS NULL;
-- useAnotherTask: running tasks of a job that marked themselves {waiting: true}.
CREATE INDEX IF NOT EXISTS job_tasks_waiting ON job_tasks(job_id, updated)
    WHERE status = 'running' AND automation_variables @> '{"waiting": true}';

-- Every planned task created through addSubTasks, kept after the planned task is deleted so that
-- getSubTasks can answer "deleted" for it (and refuse ids that are not sub-tasks of the caller).
CREATE TABLE IF NOT EXISTS agent_subtasks (
    planned_task_id  uuid PRIMARY KEY,
    parent_task_id   uuid NOT NULL,
    job_id           uuid NOT NULL,
    created_at       timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS agent_subtasks_parent ON agent_subtasks(parent_task_id);
