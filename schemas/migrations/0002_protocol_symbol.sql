-- SPEC §1: a protocol record may carry its token symbol (served by /protocols, SPEC §8).
ALTER TABLE protocols ADD COLUMN IF NOT EXISTS symbol TEXT;
