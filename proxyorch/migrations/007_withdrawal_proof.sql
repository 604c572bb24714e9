-- The payout proof of a withdrawal (seed 001: transactions[].transaction_proof, e.g. the payment
-- provider's transaction hash); null until the payout has a proof.
ALTER TABLE withdrawals ADD COLUMN IF NOT EXISTS transaction_proof text;
