-- Escrow jobs with variants (seed 002): jobs, variants, tester assignments, tester profiles, and the
-- ledger columns and kinds their escrow moves through. Money here is integer cents; the ledger keeps
-- its numeric(20, 6) units (1 cent = 0.01), converted exactly in marketplace_api/escrow_money.py.

CREATE TABLE escrow_jobs (
    id                      uuid PRIMARY KEY,
    seq                     bigserial UNIQUE,           -- cursor order (keyset pagination)
    owner_id                uuid NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    title                   text NOT NULL,
    category                text NOT NULL,
    description             text,
    description_mime_type   text,
    status                  text NOT NULL CHECK (status IN ('scheduled', 'active', 'paused', 'closing',
                                                            'completed', 'cancelled')),
    settlement_status       text NOT NULL DEFAULT 'none' CHECK (settlement_status IN (
                                'none', 'pending_approval', 'approved', 'disputed', 'cancelled')),
    target_testers          integer NOT NULL CHECK (target_testers > 0),
    amount_cents            bigint NOT NULL CHECK (amount_cents > 0),
    place_cents             bigint NOT NULL CHECK (place_cents >= amount_cents),  -- amount + fee share
    escrow_hold_cents       bigint NOT NULL CHECK (escrow_hold_cents >= 0),
    posting_minutes         integer NOT NULL,
    task_hard_minutes       integer NOT NULL,
    task_paid_minutes       integer,
    starts_at               timestamptz,
    posting_ends_at         timestamptz NOT NULL,
    proof_password_hash     bytea,
    spec                    jsonb NOT NULL,             -- the validated body (no password)
    dispute                 jsonb,
    settlement_deadline     timestamptz,
    created_at              timestamptz NOT NULL DEFAULT now(),
    updated_at              timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX escrow_jobs_owner ON escrow_jobs(owner_id, seq DESC);
CREATE INDEX escrow_jobs_open ON escrow_jobs(seq DESC) WHERE status = 'active';
CREATE INDEX escrow_jobs_sweep ON escrow_jobs(status) WHERE status IN ('scheduled', 'active', 'paused', 'closing');
CREATE INDEX escrow_jobs_settling ON escrow_jobs(settlement_deadline) WHERE settlement_status = 'pending_approval';

CREATE TABLE escrow_variants (
    id                  uuid PRIMARY KEY,
    job_id              uuid NOT NULL REFERENCES escrow_jobs(id) ON DELETE CASCADE,
    position            integer NOT NULL,
    description         text NOT NULL,
    url                 text,
    target_min          integer NOT NULL,
    target_max          integer,
    feedback_questions  jsonb NOT NULL,
    spec                jsonb NOT NULL,
    UNIQUE (job_id, position)
);

CREATE TABLE escrow_assignments (
    id                uuid PRIMARY KEY,
    job_id            uuid NOT NULL REFERENCES escrow_jobs(id) ON DELETE CASCADE,
    variant_id        uuid NOT NULL REFERENCES escrow_variants(id) ON DELETE CASCADE,
    tester_id         uuid NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    status            text NOT NULL CHECK (status IN ('active', 'completed', 'timed_out', 'abandoned')),
    payout_status     text NOT NULL DEFAULT 'none' CHECK (payout_status IN ('none', 'paid', 'withheld', 'refunded')),
    answers           jsonb,
    duration_minutes  integer,
    created_at        timestamptz NOT NULL DEFAULT now(),
    expires_at        timestamptz NOT NULL,
    completed_at      timestamptz
);
-- One place per tester per job, whatever became of it.
CREATE UNIQUE INDEX escrow_assignments_once ON escrow_assignments(job_id, tester_id);
CREATE INDEX escrow_assignments_tester ON escrow_assignments(tester_id);
CREATE INDEX escrow_assignments_expiry ON escrow_assignments(expires_at) WHERE status = 'active';

-- What a tester says about themself; audience filters match against it.
CREATE TABLE tester_profiles (
    user_id     uuid PRIMARY KEY REFERENCES users(id) ON DELETE CASCADE,
    profile     jsonb NOT NULL DEFAULT '{}',
    updated_at  timestamptz NOT NULL DEFAULT now()
);

-- The platform's own account: it receives the fee share of every paid place.
INSERT INTO users(id, name) VALUES ('00000000-0000-0000-0000-00000000fee0', 'platform') ON CONFLICT DO NOTHING;

ALTER TABLE ledger_entries ADD COLUMN IF NOT EXISTS escrow_job_id uuid REFERENCES escrow_jobs(id) ON DELETE SET NULL;
ALTER TABLE ledger_entries ADD COLUMN IF NOT EXISTS escrow_assignment_id uuid
    REFERENCES escrow_assignments(id) ON DELETE SET NULL;
ALTER TABLE ledger_entries DROP CONSTRAINT IF EXISTS ledger_entries_kind_check;
ALTER TABLE ledger_entries ADD CONSTRAINT ledger_entries_kind_check CHECK (kind IN (
    'deposit', 'withdrawal', 'job_escrow', 'escrow_refund', 'task_earning', 'referral_bonus',
    'escrow_payout', 'platform_fee'));
CREATE INDEX ledger_escrow_job ON ledger_entries(escrow_job_id) WHERE escrow_job_id IS NOT NULL;
-- A place is paid (tester payout, platform fee) or refunded at most once.
CREATE UNIQUE INDEX ledger_escrow_place_once ON ledger_entries(escrow_assignment_id, kind)
    WHERE escrow_assignment_id IS NOT NULL;
