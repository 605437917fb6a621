DROP SCHEMA IF EXISTS exp CASCADE; CREATE SCHEMA exp; SET search_path=exp;
CREATE TABLE ev (
    event_id TEXT PRIMARY KEY, shard BIGINT NOT NULL, stream_ms BIGINT NOT NULL, stream_seq BIGINT NOT NULL,
    kind TEXT NOT NULL, account_id TEXT NOT NULL, wallet TEXT NOT NULL, amount BIGINT NOT NULL,
    available_after BIGINT NOT NULL, held_after BIGINT NOT NULL, lots TEXT NOT NULL, extra TEXT NOT NULL,
    hold_id TEXT NOT NULL, charge_id TEXT NOT NULL, idempotency_key TEXT NOT NULL, operation TEXT NOT NULL,
    metadata TEXT NOT NULL, created_at_ms BIGINT NOT NULL, d_granted BIGINT NOT NULL, d_used BIGINT NOT NULL,
    d_expired BIGINT NOT NULL, d_refunded BIGINT NOT NULL, d_adjusted BIGINT NOT NULL, settled_at_ms BIGINT NOT NULL,
    version BIGINT NOT NULL DEFAULT 1, member TEXT NOT NULL DEFAULT '');
CREATE INDEX ev_history ON ev (account_id, created_at_ms DESC, event_id DESC);
CREATE INDEX ev_wallet ON ev (account_id, wallet, stream_ms, stream_seq);
CREATE UNLOGGED TABLE src AS SELECT
  (i%4)||'-'||(1764740000000+i/10)||'-'||(i%10) AS event_id, (i%4)::bigint shard, (1764740000000+i/10)::bigint stream_ms, (i%10)::bigint stream_seq,
  'debit'::text kind, 'acct-'||lpad((i*7919%1000)::text,6,'0') account_id, 'default'::text wallet, 5::bigint amount,
  (100000-i)::bigint available_after, 0::bigint held_after, '[["l-'||(i%1000)||'",5]]'::text lots, ''::text extra,
  ''::text hold_id, 'c-'||md5(i::text) charge_id, 'idem-'||md5(i::text) idempotency_key, 'sign'::text operation,
  '{}'::text metadata, (1764740000000+i/10)::bigint created_at_ms, 0::bigint d_granted, 5::bigint d_used, 0::bigint d_expired,
  0::bigint d_refunded, 0::bigint d_adjusted, 1764740000000::bigint settled_at_ms, 1::bigint version, ''::text member
  FROM generate_series(1,200000) i;
COPY src TO '/tmp/exp/rows.bin' (FORMAT binary);
