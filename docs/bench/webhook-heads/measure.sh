#!/bin/bash
# Hand measurement: due-heads query before/after schema v13 at 800k deliveries, 200k pending.
set -e
DB=tollgate_whbench_$$
A=${TOLLGATE_TEST_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/test}
psql -q $A -c "CREATE DATABASE $DB"
U=${A%/*}/$DB
trap 'psql -q $A -c "DROP DATABASE IF EXISTS $DB" ' EXIT
cd "$(dirname "$0")/../../../src/settle"
for v in 1 2 3 4 5 6 7 8 9 10 11; do psql -q $U -v ON_ERROR_STOP=1 -f schema_v$v.sql >/dev/null; done
NOW=1000000000000
psql -q $U -v ON_ERROR_STOP=1 <<SQL
INSERT INTO tollgate_webhook_deliveries (delivery_id, account_id, wallet, event_type,
 position_ms, position_seq, ordinal, payload, status, attempts, next_attempt_at_ms,
 lease_until_ms, last_error, last_status_code, created_at_ms, delivered_at_ms)
SELECT 'dlv_' || i, 'acct' || (i % 2000), 'default', 'balance.low', 900000000000 + i, 0, 0,
 '{"type":"balance.low","data":{"available":5}}',
 CASE WHEN i / 2000 < 300 THEN 'delivered' ELSE 'pending' END,
 CASE WHEN i / 2000 < 300 THEN 1 WHEN i / 2000 = 300 THEN 12 ELSE 0 END,
 CASE WHEN i / 2000 = 300 THEN (CASE WHEN i % 10 = 0 THEN $NOW - 1000 ELSE $NOW + (i::bigint * 7919) % 3600000 END)
      ELSE 900000000000 + i END,
 0, '', 0, 900000000000 + i, 0
FROM generate_series(0, 799999) i;
VACUUM ANALYZE tollgate_webhook_deliveries;
SQL
OLD="SELECT delivery_id FROM tollgate_webhook_deliveries d WHERE d.status = 'pending' AND d.next_attempt_at_ms <= $NOW AND d.lease_until_ms <= $NOW AND NOT EXISTS (SELECT 1 FROM tollgate_webhook_deliveries e WHERE e.status = 'pending' AND e.account_id = d.account_id AND (e.position_ms, e.position_seq, e.ordinal) < (d.position_ms, d.position_seq, d.ordinal)) ORDER BY d.next_attempt_at_ms, d.position_ms, d.position_seq, d.ordinal LIMIT 8"
NEW="SELECT delivery_id FROM tollgate_webhook_deliveries WHERE is_head = 1 AND status = 'pending' AND next_attempt_at_ms <= $NOW AND lease_until_ms <= $NOW ORDER BY next_attempt_at_ms, position_ms, position_seq, ordinal LIMIT 8"
echo "== old query"
for i in 1 2 3 4; do psql -q $U -c "EXPLAIN ANALYZE $OLD" | grep -E "Execution Time"; done
echo "== migration v13"
( echo '\timing on'; echo 'BEGIN;'; cat schema_v13.sql; echo 'COMMIT;' ) | psql -q $U -v ON_ERROR_STOP=1 | grep -E "^Time" 
psql -q $U -c "VACUUM ANALYZE tollgate_webhook_deliveries"
psql -q $U -At -c "SELECT COUNT(*) FROM tollgate_webhook_deliveries WHERE is_head = 1"
echo "== new query"
for i in 1 2 3 4; do psql -q $U -c "EXPLAIN ANALYZE $NEW" | grep -E "Execution Time"; done
psql -q $U -c "EXPLAIN ANALYZE $NEW"
echo "== repair_heads' search (every pending delivery, nothing to repair)"
REPAIR="SELECT DISTINCT account_id FROM tollgate_webhook_deliveries d WHERE d.status = 'pending' AND NOT EXISTS (SELECT 1 FROM tollgate_webhook_deliveries h WHERE h.account_id = d.account_id AND h.is_head = 1 AND h.status = 'pending') UNION SELECT account_id FROM tollgate_webhook_deliveries WHERE is_head = 1 AND status <> 'pending'"
for i in 1 2 3; do psql -q $U -c "EXPLAIN ANALYZE $REPAIR" | grep -E "Execution Time"; done
echo "== mark_heads for one account after its head ended (two statements)"
psql -q $U -v ON_ERROR_STOP=1 <<SQL
\timing on
BEGIN;
UPDATE tollgate_webhook_deliveries SET status = 'delivered', is_head = 0 WHERE delivery_id = 'dlv_600000';
UPDATE tollgate_webhook_deliveries SET is_head = 0 WHERE is_head = 1 AND delivery_id <> COALESCE((SELECT e.delivery_id FROM tollgate_webhook_deliveries e WHERE e.account_id = tollgate_webhook_deliveries.account_id AND e.status = 'pending' ORDER BY e.position_ms, e.position_seq, e.ordinal, e.delivery_id LIMIT 1), '') AND account_id IN ('acct0');
WITH a (account_id) AS (VALUES ('acct0')) UPDATE tollgate_webhook_deliveries SET is_head = 1 WHERE is_head = 0 AND delivery_id IN (SELECT (SELECT e.delivery_id FROM tollgate_webhook_deliveries e WHERE e.account_id = a.account_id AND e.status = 'pending' ORDER BY e.position_ms, e.position_seq, e.ordinal, e.delivery_id LIMIT 1) FROM a);
SELECT delivery_id FROM tollgate_webhook_deliveries WHERE is_head = 1 AND account_id = 'acct0';
ROLLBACK;
SQL
