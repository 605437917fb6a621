//! Every metric name in one place. Labels are bounded: shard numbers, script names, error
//! kinds, event kinds, decisions, operation names from the config; never an account id or
//! a key. The README's metrics table documents each one (name, type, labels, meaning).

use std::sync::OnceLock;
use std::time::Duration;

use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

// --- ledger (Redis scripts) ---

/// Latency of one ledger script call (FCALL, and the library reload when Redis lacks it), by `script`.
pub const REDIS_SCRIPT_SECONDS: &str = "tollgate_redis_script_duration_seconds";
/// Failed script calls, by `script` and `kind` (see [`SCRIPT_ERROR_KINDS`]).
pub const REDIS_SCRIPT_ERRORS_TOTAL: &str = "tollgate_redis_script_errors_total";
/// Business refusals answered by a script, by `script` and `reason` (INSUFFICIENT_CREDITS…).
pub const LEDGER_REFUSALS_TOTAL: &str = "tollgate_ledger_refusals_total";
/// Answers replayed from an idempotency record, by `script`.
pub const LEDGER_REPLAYS_TOTAL: &str = "tollgate_ledger_replays_total";
/// Ledger writes after which `WAIT` (`redis.wait_replicas`) heard from fewer replicas than
/// asked within `redis.wait_timeout_ms`: the write is committed on the primary only.
pub const REDIS_WAIT_SHORT_TOTAL: &str = "tollgate_redis_wait_short_total";
/// Redis connections the pool's watchdog replaced: calls on them kept ending at their
/// deadline while a freshly made connection answered (ledger::redis_pool, the watchdog).
pub const REDIS_CONNECTIONS_REPLACED_TOTAL: &str = "tollgate_redis_connections_replaced_total";

/// Error kinds of a script call: no answer within the deadline; Redis unreachable; Redis
/// answered with an error (a script error, OOM, …); an answer tollgate does not understand.
pub const SCRIPT_ERROR_KINDS: [&str; 4] = ["timeout", "unavailable", "redis", "reply"];

// --- credits (counted from settled ledger events, each event once) ---

/// Credits charged (the ledger's `used`), by ledger `event` (debit, capture, expire_hold).
pub const CREDITS_CHARGED_TOTAL: &str = "tollgate_credits_charged_total";
/// Credits granted, by lot `kind` (purchase, demo, promo, adjustment).
pub const CREDITS_GRANTED_TOTAL: &str = "tollgate_credits_granted_total";
/// Credits refunded.
pub const CREDITS_REFUNDED_TOTAL: &str = "tollgate_credits_refunded_total";
/// Credits expired, by ledger `event` (expire_lot; refund when refunded credits' lot had
/// already expired).
pub const CREDITS_EXPIRED_TOTAL: &str = "tollgate_credits_expired_total";
/// Credits added or removed by admin adjustments, by `direction` (up, down).
pub const CREDITS_ADJUSTED_TOTAL: &str = "tollgate_credits_adjusted_total";
/// Open holds in the whole ledger (from the durable store's running count).
pub const HOLDS_ACTIVE: &str = "tollgate_holds_active";

// --- settlement ---

/// Ledger events written to the store for the first time (redeliveries not counted).
pub const SETTLED_EVENTS_TOTAL: &str = "tollgate_settled_events_total";
/// Events per settled batch.
pub const SETTLE_BATCH_EVENTS: &str = "tollgate_settle_batch_events";
/// Time to write one batch to the store.
pub const SETTLE_BATCH_SECONDS: &str = "tollgate_settle_batch_duration_seconds";
/// Failed store writes and migrations, by `kind` (`StoreError::kind`; every kind is
/// registered at 0 by the settler: `store::STORE_ERROR_KINDS`).
pub const STORE_ERRORS_TOTAL: &str = "tollgate_store_errors_total";
/// Failed settler rounds, by `kind` (redis, store).
pub const SETTLER_ROUND_ERRORS_TOTAL: &str = "tollgate_settler_round_errors_total";
/// Outbox entries the settler could not read, or whose event the store refused, moved to
/// the dead-letter stream, by `shard`.
pub const SETTLE_DEAD_LETTERS_TOTAL: &str = "tollgate_settle_dead_letters_total";
/// Events read from a Redis that lost its data, refused by the store because a restore
/// rebuilt their shard since (schema_v5.sql, the shard fences).
pub const SETTLE_FENCED_EVENTS_TOTAL: &str = "tollgate_settle_fenced_events_total";
/// Events whose id the store already holds for a different event (an id a rolled-back
/// Redis reused), moved to the dead-letter stream instead of taken as already written.
pub const SETTLE_REUSED_EVENT_IDS_TOTAL: &str = "tollgate_settle_reused_event_ids_total";
/// Entries in a shard's outbox stream (settled entries are trimmed), by `shard`.
pub const OUTBOX_LENGTH: &str = "tollgate_outbox_length";
/// Age of the oldest unsettled event of a shard, by `shard`.
pub const OUTBOX_OLDEST_AGE_SECONDS: &str = "tollgate_outbox_oldest_unsettled_age_seconds";
/// How long ago this process's settler last measured the outboxes (it does every
/// `settler.trim_interval_ms`; a stuck settler stops).
pub const SETTLER_MEASURED_AGE_SECONDS: &str = "tollgate_settler_last_measurement_age_seconds";
/// 1 once a background task of this process (`task`: settler, webhooks, sweeper,
/// spool_replayer, access_log_retrier, shard_initializer, restorer, reloader) ended before
/// shutdown (a panic, an early return), else 0; until the process restarts.
pub const BACKGROUND_TASK_ENDED: &str = "tollgate_background_task_ended";

// --- usage webhooks ---

/// Webhook deliveries created from settled events, by `type` (balance.low, …).
pub const WEBHOOK_EVENTS_TOTAL: &str = "tollgate_webhook_events_total";
/// Delivery attempts, by `type` and `result` (delivered, retry, gave_up).
pub const WEBHOOK_ATTEMPTS_TOTAL: &str = "tollgate_webhook_attempts_total";
/// Duration of one delivery attempt (POST until the response status).
pub const WEBHOOK_ATTEMPT_SECONDS: &str = "tollgate_webhook_attempt_duration_seconds";
/// Deliveries not yet delivered (pending or retrying).
pub const WEBHOOK_PENDING: &str = "tollgate_webhook_pending_deliveries";

// --- requests ---

/// gRPC requests answered with a status other than OK, by `service` and `code`.
pub const GRPC_FAILED_REQUESTS_TOTAL: &str = "tollgate_grpc_failed_requests_total";
/// Whether this process is ready (the /readyz checks, measured by the health watcher):
/// `/readyz` answers 200. A serving process stays ready while Redis is unreachable (it
/// lists it as degraded), so [`REDIS_UP`] is what says Redis is gone.
pub const READY: &str = "tollgate_ready";
/// Whether Redis answered the health watcher's last round (every 2 s) and took its write
/// (a Redis refusing writes fails every charge), 1 or 0: a Redis outage leaves a serving
/// pod ready, and is alerted on from this.
pub const REDIS_UP: &str = "tollgate_redis_up";

// --- gateway (recorded by the gateway module) ---

/// (gateway) Checks by `decision` (allow, deny) and `operation` (price book names).
pub const CHECKS_TOTAL: &str = "tollgate_checks_total";
/// (gateway) Latency of a whole check (no labels).
pub const CHECK_SECONDS: &str = "tollgate_check_duration_seconds";
/// (gateway) Denied checks, by `reason`.
pub const GATEWAY_DENIALS_TOTAL: &str = "tollgate_gateway_denials_total";
/// (gateway) Identity lookups answered from the in-process cache.
pub const IDENTITY_CACHE_HITS_TOTAL: &str = "tollgate_identity_cache_hits_total";
/// (gateway) Identity lookups that went to Redis.
pub const IDENTITY_CACHE_MISSES_TOTAL: &str = "tollgate_identity_cache_misses_total";
/// (gateway) Checks allowed without charging because Redis was unavailable and the
/// operation is `fail_open`, by `operation`.
pub const FAIL_OPEN_TOTAL: &str = "tollgate_fail_open_total";
/// (gateway) Price book / config reloads, by `result` (ok, error).
pub const CONFIG_RELOADS_TOTAL: &str = "tollgate_config_reloads_total";
/// (gateway) fail_open charges written to the local spool, each once (a charge the replay
/// spools again, behind the others, is not counted again).
pub const SPOOL_WRITTEN_TOTAL: &str = "tollgate_spool_written_total";
/// (gateway) fail_open charges lost before the ledger saw them: the spool queue was full,
/// the disk refused the write, or a line was torn by a crash.
pub const SPOOL_DROPPED_TOTAL: &str = "tollgate_spool_dropped_total";
/// (gateway) Spooled charges sent to the ledger once Redis returned, by `result`
/// (charged, duplicate, refused, later).
pub const SPOOL_REPLAYED_TOTAL: &str = "tollgate_spool_replayed_total";
/// (gateway) Replay positions the disk did not take (full, failing): the replay goes on
/// from the position in memory; a restart would resume from the last one saved.
pub const SPOOL_POSITION_UNSAVED_TOTAL: &str = "tollgate_spool_position_unsaved_total";
/// (gateway) Envoy access-log entries that left their hold open, by `reason`: Envoy ended
/// the request after the API may have received it (its response flag: DC, UT, UC, …), so
/// its status is not the API's answer (gateway::access_log::LEFT_OPEN_REASONS).
pub const ACCESS_LOG_HOLDS_LEFT_OPEN_TOTAL: &str = "tollgate_access_log_holds_left_open_total";
/// (gateway) Envoy access-log settlements handed over to be retried off the stream: they
/// met a transient ledger error (Redis unavailable, a shard awaiting restore), or came
/// while the last one had. Each counted once, by how it ended: `result` settled,
/// hold_ended, failed, gave_up, queue_full, shutdown (gateway::access_log::retry::Ended).
pub const ACCESS_LOG_RETRIES_TOTAL: &str = "tollgate_access_log_retries_total";
/// (gateway) Voids of `fail_closed` charges whose check was answered `unavailable` after
/// its deadline while the charge may still run late, each counted once by `outcome`:
/// refunded, released, nothing, failed, gave_up, dropped (gateway::void::VoidEnd).
pub const GATEWAY_VOIDS_TOTAL: &str = "tollgate_gateway_voids_total";

/// The gateway's metric names (recorded on the gateway branch; see README).
pub const GATEWAY_METRICS: [&str; 14] = [
    CHECKS_TOTAL,
    CHECK_SECONDS,
    GATEWAY_DENIALS_TOTAL,
    IDENTITY_CACHE_HITS_TOTAL,
    IDENTITY_CACHE_MISSES_TOTAL,
    FAIL_OPEN_TOTAL,
    CONFIG_RELOADS_TOTAL,
    SPOOL_WRITTEN_TOTAL,
    SPOOL_DROPPED_TOTAL,
    SPOOL_REPLAYED_TOTAL,
    SPOOL_POSITION_UNSAVED_TOTAL,
    ACCESS_LOG_HOLDS_LEFT_OPEN_TOTAL,
    ACCESS_LOG_RETRIES_TOTAL,
    GATEWAY_VOIDS_TOTAL,
];

/// Buckets for the hot path (checks, script calls): sub-millisecond resolution, up to the
/// slowest call a deadline allows.
const HOT_PATH_BUCKETS: &[f64] = &[
    0.00005, 0.0001, 0.00025, 0.0005, 0.00075, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
    0.5, 1.0,
];
/// Latency buckets for slower work (store batches, webhook POSTs).
const SECONDS_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];
const BATCH_BUCKETS: &[f64] = &[1.0, 10.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2000.0, 5000.0];

/// How often histogram samples are folded into their buckets when nobody scrapes: without
/// it, samples of the hot path would pile up in memory between scrapes.
pub const UPKEEP_INTERVAL: Duration = Duration::from_secs(5);

static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// Installs the Prometheus recorder once per process; returns the handle that renders
/// `/metrics` (None if another recorder was installed first). Call it before resolving
/// metric handles: handles resolved earlier record nowhere.
pub fn install() -> Option<PrometheusHandle> {
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), SECONDS_BUCKETS)
                .and_then(|b| {
                    b.set_buckets_for_metric(
                        Matcher::Full(REDIS_SCRIPT_SECONDS.into()),
                        HOT_PATH_BUCKETS,
                    )
                })
                .and_then(|b| {
                    b.set_buckets_for_metric(Matcher::Full(CHECK_SECONDS.into()), HOT_PATH_BUCKETS)
                })
                .and_then(|b| {
                    b.set_buckets_for_metric(
                        Matcher::Full(SETTLE_BATCH_EVENTS.into()),
                        BATCH_BUCKETS,
                    )
                });
            match builder.and_then(|b| b.install_recorder()) {
                Ok(handle) => {
                    describe();
                    let upkeep = handle.clone();
                    let spawned = std::thread::Builder::new()
                        .name("metrics-upkeep".into())
                        .spawn(move || loop {
                            std::thread::sleep(UPKEEP_INTERVAL);
                            upkeep.run_upkeep();
                        });
                    if let Err(err) = spawned {
                        tracing::warn!(error = %err, "no metrics upkeep thread");
                    }
                    Some(handle)
                }
                Err(err) => {
                    tracing::warn!(error = %err, "metrics recorder not installed");
                    None
                }
            }
        })
        .clone()
}

/// HELP lines for every metric this process records.
fn describe() {
    describe_histogram!(
        REDIS_SCRIPT_SECONDS,
        Unit::Seconds,
        "Latency of one ledger script call, by script."
    );
    describe_counter!(
        REDIS_SCRIPT_ERRORS_TOTAL,
        "Failed ledger script calls, by script and kind."
    );
    describe_counter!(
        REDIS_WAIT_SHORT_TOTAL,
        "Ledger writes acknowledged by fewer replicas than redis.wait_replicas within redis.wait_timeout_ms."
    );
    describe_counter!(
        REDIS_CONNECTIONS_REPLACED_TOTAL,
        "Redis connections replaced because they stopped answering while a new connection answered."
    );
    describe_counter!(
        LEDGER_REFUSALS_TOTAL,
        "Business refusals answered by ledger scripts, by script and reason."
    );
    describe_counter!(
        LEDGER_REPLAYS_TOTAL,
        "Ledger answers replayed from an idempotency record, by script."
    );
    describe_counter!(
        CREDITS_CHARGED_TOTAL,
        "Credits charged, from settled ledger events, by event."
    );
    describe_counter!(
        CREDITS_GRANTED_TOTAL,
        "Credits granted, from settled ledger events, by lot kind."
    );
    describe_counter!(
        CREDITS_REFUNDED_TOTAL,
        "Credits refunded, from settled ledger events."
    );
    describe_counter!(
        CREDITS_EXPIRED_TOTAL,
        "Credits expired, from settled ledger events, by event."
    );
    describe_counter!(
        CREDITS_ADJUSTED_TOTAL,
        "Credits added or removed by adjustments, by direction."
    );
    describe_gauge!(HOLDS_ACTIVE, "Open holds in the ledger (settled view).");
    describe_counter!(
        SETTLED_EVENTS_TOTAL,
        "Ledger events written to the durable store for the first time."
    );
    describe_histogram!(SETTLE_BATCH_EVENTS, "Events per settled batch.");
    describe_histogram!(
        SETTLE_BATCH_SECONDS,
        Unit::Seconds,
        "Time to write one batch to the durable store."
    );
    describe_counter!(
        STORE_ERRORS_TOTAL,
        "Failed store writes and migrations, by kind."
    );
    describe_counter!(
        SETTLE_DEAD_LETTERS_TOTAL,
        "Outbox entries the settler could not read, or whose event the store refused, moved to <outbox>:dead and acknowledged, by shard."
    );
    describe_counter!(
        SETTLE_FENCED_EVENTS_TOTAL,
        "Events read from a Redis that lost its data, not settled because a restore rebuilt their shard without them."
    );
    describe_counter!(
        SETTLE_REUSED_EVENT_IDS_TOTAL,
        "Events whose id the store already holds for a different event (reused by a rolled-back Redis), moved to <outbox>:dead instead of skipped."
    );
    describe_counter!(
        SETTLER_ROUND_ERRORS_TOTAL,
        "Failed settler rounds, by kind."
    );
    describe_gauge!(OUTBOX_LENGTH, "Entries in a shard's outbox stream.");
    describe_gauge!(
        OUTBOX_OLDEST_AGE_SECONDS,
        Unit::Seconds,
        "Age of the oldest unsettled event of a shard (as of the settler's last measurement, aged since)."
    );
    describe_gauge!(
        SETTLER_MEASURED_AGE_SECONDS,
        Unit::Seconds,
        "Time since this process's settler last measured the outboxes (grows when it is stuck)."
    );
    describe_gauge!(
        BACKGROUND_TASK_ENDED,
        "1 once a background task (settler, webhooks, sweeper, ...) ended before shutdown, until the process restarts."
    );
    describe_counter!(
        WEBHOOK_EVENTS_TOTAL,
        "Webhook deliveries created from settled events, by type."
    );
    describe_counter!(
        WEBHOOK_ATTEMPTS_TOTAL,
        "Webhook delivery attempts, by type and result."
    );
    describe_histogram!(
        WEBHOOK_ATTEMPT_SECONDS,
        Unit::Seconds,
        "Duration of one webhook delivery attempt."
    );
    describe_gauge!(WEBHOOK_PENDING, "Webhook deliveries not yet delivered.");
    describe_counter!(
        GRPC_FAILED_REQUESTS_TOTAL,
        "gRPC requests answered with a status other than OK, by service and code."
    );
    describe_gauge!(READY, "1 when this process is ready, else 0.");
    describe_gauge!(
        REDIS_UP,
        "1 when Redis answered the last readiness round, else 0."
    );
}

/// A bounded `service` label for a gRPC path `/package.Service/Method`: the services
/// tollgate serves, else "other" (clients choose paths, so they cannot be labels as is).
pub fn grpc_service_label(path: &str) -> &'static str {
    const SERVICES: [&str; 7] = [
        "tollgate.v1.Metering",
        "tollgate.v1.Admin",
        "envoy.service.auth.v3.Authorization",
        "envoy.service.accesslog.v3.AccessLogService",
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
    ];
    let service = path
        .strip_prefix('/')
        .and_then(|p| p.split_once('/'))
        .map(|(s, _)| s)
        .unwrap_or("");
    SERVICES
        .iter()
        .find(|s| **s == service)
        .copied()
        .unwrap_or("other")
}

/// The name of a gRPC status code, for labels and logs.
pub fn grpc_code_label(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "OK",
        Cancelled => "CANCELLED",
        Unknown => "UNKNOWN",
        InvalidArgument => "INVALID_ARGUMENT",
        DeadlineExceeded => "DEADLINE_EXCEEDED",
        NotFound => "NOT_FOUND",
        AlreadyExists => "ALREADY_EXISTS",
        PermissionDenied => "PERMISSION_DENIED",
        ResourceExhausted => "RESOURCE_EXHAUSTED",
        FailedPrecondition => "FAILED_PRECONDITION",
        Aborted => "ABORTED",
        OutOfRange => "OUT_OF_RANGE",
        Unimplemented => "UNIMPLEMENTED",
        Internal => "INTERNAL",
        Unavailable => "UNAVAILABLE",
        DataLoss => "DATA_LOSS",
        Unauthenticated => "UNAUTHENTICATED",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_labels_are_bounded() {
        assert_eq!(
            grpc_service_label("/tollgate.v1.Metering/Debit"),
            "tollgate.v1.Metering"
        );
        assert_eq!(grpc_service_label("/evil.Service/x"), "other");
        assert_eq!(grpc_service_label("garbage"), "other");
        assert_eq!(grpc_code_label(tonic::Code::Unavailable), "UNAVAILABLE");
    }

    #[test]
    fn names_are_unique_and_prefixed() {
        let mut names = vec![
            REDIS_SCRIPT_SECONDS,
            REDIS_SCRIPT_ERRORS_TOTAL,
            REDIS_WAIT_SHORT_TOTAL,
            LEDGER_REFUSALS_TOTAL,
            LEDGER_REPLAYS_TOTAL,
            CREDITS_CHARGED_TOTAL,
            CREDITS_GRANTED_TOTAL,
            CREDITS_REFUNDED_TOTAL,
            CREDITS_EXPIRED_TOTAL,
            CREDITS_ADJUSTED_TOTAL,
            HOLDS_ACTIVE,
            SETTLED_EVENTS_TOTAL,
            SETTLE_BATCH_EVENTS,
            SETTLE_BATCH_SECONDS,
            STORE_ERRORS_TOTAL,
            SETTLER_ROUND_ERRORS_TOTAL,
            SETTLE_DEAD_LETTERS_TOTAL,
            SETTLE_FENCED_EVENTS_TOTAL,
            SETTLE_REUSED_EVENT_IDS_TOTAL,
            OUTBOX_LENGTH,
            OUTBOX_OLDEST_AGE_SECONDS,
            SETTLER_MEASURED_AGE_SECONDS,
            BACKGROUND_TASK_ENDED,
            WEBHOOK_EVENTS_TOTAL,
            WEBHOOK_ATTEMPTS_TOTAL,
            WEBHOOK_ATTEMPT_SECONDS,
            WEBHOOK_PENDING,
            GRPC_FAILED_REQUESTS_TOTAL,
            READY,
            REDIS_UP,
        ];
        names.extend(GATEWAY_METRICS);
        let count = names.len();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), count);
        assert!(names.iter().all(|n| n.starts_with("tollgate_")));
    }
}
