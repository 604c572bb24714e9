-- Marketplace: automations, jobs, planned tasks, job tasks, agent tokens, ledger, withdrawals,
-- buckets and temporary files. Money is numeric(20, 6): exact, never float.

ALTER TABLE users ADD COLUMN IF NOT EXISTS wallet_address text;

CREATE TABLE automations (
    id                            uuid PRIMARY KEY,
    name                          text NOT NULL,
    owner_user_id                 uuid REFERENCES users(id) ON DELETE SET NULL,
    code                          text,
    automation_parameters_schema  jsonb,
    job_variables_schema          jsonb,
    bucket_schema                 jsonb,
    created_at                    timestamptz NOT NULL DEFAULT now()
);

-- Automations installed on a device (read by GET /api/v2/devices).
CREATE TABLE device_automations (
    remote_device_id  uuid NOT NULL REFERENCES devices(remote_device_id) ON DELETE CASCADE,
    automation_id     uuid NOT NULL REFERENCES automations(id) ON DELETE CASCADE,
    added             timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (remote_device_id, automation_id)
);

CREATE TABLE jobs (
    id                     uuid PRIMARY KEY,
    user_id                uuid NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    job_type               text NOT NULL DEFAULT 'job' CHECK (job_type IN ('job', 'devices_automation')),
    payment_type           text NOT NULL DEFAULT 'action',
    title                  text NOT NULL,
    category               text[] NOT NULL DEFAULT '{}',
    description            text NOT NULL,
    proof                  text NOT NULL,
    is_proof_file          boolean NOT NULL DEFAULT false,
    auto_rate              boolean NOT NULL DEFAULT false,
    vcode                  text,
    target_workers         text[] NOT NULL DEFAULT '{worldwide}',
    few_times              boolean NOT NULL DEFAULT false,
    premium                boolean NOT NULL DEFAULT false,
    featured               boolean NOT NULL DEFAULT false,
    duration               integer NOT NULL CHECK (duration > 0),
    positions              integer NOT NULL CHECK (positions > 0),
    daily_limit            integer NOT NULL DEFAULT 0 CHECK (daily_limit >= 0),
    task_limit             integer CHECK (task_limit IS NULL OR task_limit > 0),
    min_rating             numeric(4, 2) NOT NULL DEFAULT 0,
    job_price              numeric(20, 6) NOT NULL CHECK (job_price > 0),
    status                 text NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'inactive', 'completed')),
    files                  jsonb NOT NULL DEFAULT '[]',
    allowed_workers        uuid[] NOT NULL DEFAULT '{}',
    worker_invites         uuid[] NOT NULL DEFAULT '{}',
    shared_view            uuid[] NOT NULL DEFAULT '{}',
    shared_edit            uuid[] NOT NULL DEFAULT '{}',
    automation_id          uuid REFERENCES automations(id) ON DELETE RESTRICT,
    automation_parameters  jsonb,
    allow_sub_tasks        boolean NOT NULL DEFAULT false,
    timeout                integer NOT NULL DEFAULT 3600 CHECK (timeout > 0),
    added                  timestamptz NOT NULL DEFAULT now(),
    updated                timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX jobs_user ON jobs(user_id, added DESC);
CREATE INDEX jobs_status ON jobs(status, added DESC);
CREATE INDEX jobs_automation ON jobs(automation_id);

CREATE TABLE job_tasks (
    id                    uuid PRIMARY KEY,
    job_id                uuid NOT NULL REFERENCES jobs(id) ON DELETE CASCADE,
    worker_id             uuid NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    remote_device_id      uuid REFERENCES devices(remote_device_id) ON DELETE SET NULL,
    planned_task_id       uuid,
    parent_task_id        uuid REFERENCES job_tasks(id) ON DELETE SET NULL,
    mode                  text NOT NULL DEFAULT 'manual' CHECK (mode IN ('manual', 'automation', 'dump')),
    job_proof             text NOT NULL DEFAULT '',
    comment               text NOT NULL DEFAULT '',
    country_code          text,
    worker_ip             text,
    status                text NOT NULL,
    failure_reason        text,
    reviewed              boolean,
    device_owner_share    numeric(20, 6),
    proof_files_info      jsonb NOT NULL DEFAULT '[]',
    automation_variables  jsonb,
    timeout               integer NOT NULL DEFAULT 3600,
    finished              boolean NOT NULL DEFAULT false,
    added                 timestamptz NOT NULL DEFAULT now(),
    updated               timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX job_tasks_job ON job_tasks(job_id, added DESC);
CREATE INDEX job_tasks_worker ON job_tasks(worker_id, added DESC);
CREATE INDEX job_tasks_device_running ON job_tasks(remote_device_id) WHERE status = 'running';
-- One running task per device at a time: the database refuses a second one.
CREATE UNIQUE INDEX job_tasks_one_running_per_device ON job_tasks(remote_device_id)
    WHERE status = 'running' AND remote_device_id IS NOT NULL;

-- Pre-defined inputs of a job. job_task_id is NULL while unassigned; reserved_* hold a manual
-- worker's claim between tasks/apply and tasks/submit.
CREATE TABLE planned_tasks (
    id                uuid PRIMARY KEY,
    job_id            uuid NOT NULL REFERENCES jobs(id) ON DELETE CASCADE,
    input             text NOT NULL,
    remote_device_id  uuid REFERENCES devices(remote_device_id) ON DELETE SET NULL,
    parent_task_id    uuid REFERENCES job_tasks(id) ON DELETE SET NULL,
    job_task_id       uuid REFERENCES job_tasks(id) ON DELETE SET NULL,
    reserved_by       uuid REFERENCES users(id) ON DELETE SET NULL,
    reserved_until    timestamptz,
    attempts          integer NOT NULL DEFAULT 0,
    added             timestamptz NOT NULL DEFAULT now(),
    updated           timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX planned_tasks_job_unassigned ON planned_tasks(job_id, added) WHERE job_task_id IS NULL;
CREATE UNIQUE INDEX planned_tasks_job_task ON planned_tasks(job_task_id) WHERE job_task_id IS NOT NULL;
ALTER TABLE job_tasks ADD CONSTRAINT job_tasks_planned_fk
    FOREIGN KEY (planned_task_id) REFERENCES planned_tasks(id) ON DELETE SET NULL;

-- Agent tokens: minted for one running job task on one device; only the SHA-256 is stored.
CREATE TABLE agent_tokens (
    token_hash        bytea PRIMARY KEY,
    job_task_id       uuid NOT NULL REFERENCES job_tasks(id) ON DELETE CASCADE,
    remote_device_id  uuid NOT NULL REFERENCES devices(remote_device_id) ON DELETE CASCADE,
    expires_at        timestamptz NOT NULL,
    revoked           boolean NOT NULL DEFAULT false,
    created_at        timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX agent_tokens_task ON agent_tokens(job_task_id);

-- Every money movement. A user's spendable balance is SUM(amount) of their rows.
CREATE TABLE ledger_entries (
    id             bigserial PRIMARY KEY,
    user_id        uuid NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    amount         numeric(20, 6) NOT NULL CHECK (amount <> 0),
    kind           text NOT NULL CHECK (kind IN ('deposit', 'withdrawal', 'job_escrow', 'escrow_refund',
                                                 'task_earning', 'referral_bonus')),
    job_id         uuid REFERENCES jobs(id) ON DELETE SET NULL,
    job_task_id    uuid REFERENCES job_tasks(id) ON DELETE SET NULL,
    withdrawal_id  uuid,
    memo           text,
    created_at     timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX ledger_user ON ledger_entries(user_id, created_at);
-- A task is paid (and its referral bonus granted) at most once.
CREATE UNIQUE INDEX ledger_task_once ON ledger_entries(job_task_id, kind)
    WHERE kind IN ('task_earning', 'referral_bonus');

CREATE TABLE withdrawals (
    id              uuid PRIMARY KEY,
    reference_id    text NOT NULL,
    user_id         uuid NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    amount          numeric(20, 6) NOT NULL CHECK (amount > 0),
    fee             numeric(20, 6) NOT NULL DEFAULT 0,
    currency        text NOT NULL DEFAULT 'USD',
    payment_method  text NOT NULL DEFAULT 'crypto',
    wallet_address  text NOT NULL,
    status          text NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'paid', 'rejected')),
    reason          text,
    created         timestamptz NOT NULL DEFAULT now(),
    updated         timestamptz NOT NULL DEFAULT now(),
    process_date    timestamptz
);
CREATE INDEX withdrawals_user ON withdrawals(user_id, created DESC);

CREATE TABLE job_buckets (
    id                uuid NOT NULL UNIQUE,
    job_id            uuid NOT NULL REFERENCES jobs(id) ON DELETE CASCADE,
    remote_device_id  uuid NOT NULL REFERENCES devices(remote_device_id) ON DELETE CASCADE,
    data              jsonb NOT NULL DEFAULT '{}',
    updated_at        timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (job_id, remote_device_id)
);

CREATE TABLE device_buckets (
    remote_device_id  uuid PRIMARY KEY REFERENCES devices(remote_device_id) ON DELETE CASCADE,
    data              jsonb NOT NULL DEFAULT '{}',
    updated_at        timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE temp_files (
    filename       text PRIMARY KEY,
    original_name  text NOT NULL,
    user_id        uuid NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    size           bigint NOT NULL,
    content_type   text,
    created_at     timestamptz NOT NULL DEFAULT now(),
    expires_at     timestamptz NOT NULL
);
CREATE INDEX temp_files_expiry ON temp_files(expires_at);
