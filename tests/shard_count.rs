//! The shard count (`ledger.shards`) is fixed for a deployment's life: it is persisted in
//! Redis (every shard's `{tg:S}:shards`) and the store, and `serve`, `settle`,
//! `reconcile` and `restore` refuse another one (settle/shard_count.rs).

mod common;

use std::time::Duration;

use tollgate::config::Config;
use tollgate::ledger::Clock;
use tollgate::settle::Store;

/// How long a refused start may take at most (it is refused at once; generous for CI).
const REFUSAL_TIMEOUT: Duration = Duration::from_secs(60);

fn with_shards(config: &Config, shards: u16) -> Config {
    let mut config = config.clone();
    config.ledger.shards = shards;
    config
}

/// `serve` with `config`, expected to refuse to start: its error.
async fn serve_refused(config: Config) -> String {
    let ledger = tollgate::server::ledger_from_config(&config, Clock::Redis).expect("ledger");
    let grpc = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let http = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let ran = tokio::time::timeout(
        REFUSAL_TIMEOUT,
        tollgate::server::run(config, ledger, grpc, http, std::future::pending()),
    )
    .await
    .expect("serve was not refused: it still runs");
    ran.expect_err("serve started").to_string()
}

/// `settle` with `config`, expected to refuse to start: its error.
async fn settle_refused(config: Config) -> String {
    let ledger = tollgate::server::ledger_from_config(&config, Clock::Redis).expect("ledger");
    let http = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let ran = tokio::time::timeout(
        REFUSAL_TIMEOUT,
        tollgate::server::run_settler(config, ledger, http, std::future::pending()),
    )
    .await
    .expect("settle was not refused: it still runs");
    ran.expect_err("settle started").to_string()
}

/// An operator tool run with the shard count `shards`, expected to fail: its stderr.
fn tool_refused(command: &str, config: &Config, shards: u16) -> String {
    let out = common::output_within(
        common::tollgate()
            .args([
                command,
                "--redis-url",
                &config.redis.url,
                "--store",
                &config.store.url,
            ])
            .env("TOLLGATE_LEDGER__SHARDS", shards.to_string()),
        common::COMMAND_TIMEOUT,
    );
    assert!(!out.status.success(), "{command} with {shards} shards ran");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn assert_names_counts(error: &str, configured: u16, persisted: &str) {
    assert!(
        error.contains(&format!("ledger.shards is {configured}")) && error.contains(persisted),
        "the refusal names ledger.shards, {configured} and {persisted}: {error}"
    );
}

async fn redis_get(redis: &common::RedisServer, key: &str) -> Option<String> {
    let mut con = redis
        .client()
        .get_multiplexed_async_connection()
        .await
        .expect("redis");
    redis::cmd("GET")
        .arg(key)
        .query_async(&mut con)
        .await
        .expect("GET")
}

/// A deployment started with 16 shards: 32 (accounts would move to other shards) and 8
/// (shards 8..15 would no longer be settled or swept) are refused by `serve`, `settle`,
/// `reconcile` and `restore`; 16 starts again. The same over PostgreSQL and SQLite.
async fn another_count_is_refused(config: Config, redis: &common::RedisServer) {
    let server = common::TestServer::start(with_shards(&config, 16), Clock::Redis).await;
    server
        .ledger
        .grant(&common::purchase("acct-1", 1_000, "g1"))
        .await
        .expect("grant");
    server.stop().await;
    for shard in [0, 12, 15] {
        assert_eq!(
            redis_get(redis, &format!("{{tg:{shard}}}:shards"))
                .await
                .as_deref(),
            Some("16"),
            "shard {shard} holds the count it belongs to"
        );
    }
    let store = Store::connect_lazy(&config.store.url, 1).expect("store");
    assert_eq!(store.shard_count().await.expect("count"), Some(16));

    for shards in [32, 8] {
        let refused = serve_refused(with_shards(&config, shards)).await;
        assert_names_counts(&refused, shards, "16");
        let refused = settle_refused(with_shards(&config, shards)).await;
        assert_names_counts(&refused, shards, "16");
        for tool in ["reconcile", "restore"] {
            let refused = tool_refused(tool, &config, shards);
            assert_names_counts(&refused, shards, "16");
        }
    }
    // Redis alone refuses another count while the store is unreachable.
    let mut store_down = with_shards(&config, 32);
    store_down.store.url = "postgres://tollgate@127.0.0.1:1/tollgate".into();
    let refused = serve_refused(store_down).await;
    assert_names_counts(&refused, 32, "16");
    // Nothing was marked for another count: no shard past 15 has a marker or a count.
    for shard in [16, 28, 31] {
        assert_eq!(
            redis_get(redis, &format!("{{tg:{shard}}}:epoch")).await,
            None
        );
        assert_eq!(
            redis_get(redis, &format!("{{tg:{shard}}}:shards")).await,
            None
        );
    }
    assert_eq!(store.shard_count().await.expect("count"), Some(16));

    // A shard that lost its marker is never marked new for another count.
    let mut con = redis
        .client()
        .get_multiplexed_async_connection()
        .await
        .expect("redis");
    let _: i64 = redis::cmd("DEL")
        .arg("{tg:3}:epoch")
        .query_async(&mut con)
        .await
        .expect("DEL");
    let ledger32 = tollgate::server::ledger_from_config(&with_shards(&config, 32), Clock::Redis)
        .expect("ledger");
    let token = ledger32.claim_new_shard(3).await.expect("claim");
    let marked = ledger32
        .mark_new_shard(3, &tollgate::ledger::new_epoch(), &token)
        .await;
    assert!(
        marked
            .as_ref()
            .is_err_and(|e| e.to_string().contains("ledger.shards is 32")),
        "a shard of 16 marked for 32: {marked:?}"
    );
    assert_eq!(redis_get(redis, "{tg:3}:epoch").await, None);

    // The same count starts (and marks the shard again).
    let server = common::TestServer::start(with_shards(&config, 16), Clock::Redis).await;
    let balance = server.ledger.balance("acct-1", "default").await;
    assert!(
        format!("{balance:?}").contains("1000"),
        "acct-1 keeps its wallet: {balance:?}"
    );
    server.stop().await;
}

#[tokio::test]
async fn another_count_is_refused_sqlite() {
    let redis = common::RedisServer::start();
    let config = common::test_config(&redis.url());
    another_count_is_refused(config, &redis).await;
}

#[tokio::test]
async fn another_count_is_refused_postgres() {
    let redis = common::RedisServer::start();
    let pg = common::PgDatabase::create().await;
    let mut config = common::test_config(&redis.url());
    config.store.url = pg.url.clone();
    another_count_is_refused(config, &redis).await;
}

/// A deployment made before the count was persisted (epoch markers only, no count in
/// Redis or the store): a grown count is seen by the markers that stop short of it, a
/// shrunk one by the markers past it; its own count starts and is persisted.
async fn an_older_deployment_is_checked_and_persisted(config: Config, redis: &common::RedisServer) {
    let ledger = tollgate::server::ledger_from_config(&with_shards(&config, 16), Clock::Redis)
        .expect("ledger");
    common::initialize_blocking(&ledger, &redis.url());
    assert_eq!(redis_get(redis, "{tg:0}:shards").await, None);

    let refused = serve_refused(with_shards(&config, 32)).await;
    assert_names_counts(&refused, 32, "probably 16");
    let refused = serve_refused(with_shards(&config, 8)).await;
    assert_names_counts(&refused, 8, "epoch marker of shard 15");
    assert_eq!(redis_get(redis, "{tg:0}:shards").await, None);

    let server = common::TestServer::start(with_shards(&config, 16), Clock::Redis).await;
    server.stop().await;
    for shard in 0..16 {
        assert_eq!(
            redis_get(redis, &format!("{{tg:{shard}}}:shards"))
                .await
                .as_deref(),
            Some("16")
        );
    }
    let store = Store::connect_lazy(&config.store.url, 1).expect("store");
    assert_eq!(store.shard_count().await.expect("count"), Some(16));
    let refused = serve_refused(with_shards(&config, 32)).await;
    assert_names_counts(&refused, 32, "16");
}

#[tokio::test]
async fn an_older_deployment_is_checked_and_persisted_sqlite() {
    let redis = common::RedisServer::start();
    let config = common::test_config(&redis.url());
    an_older_deployment_is_checked_and_persisted(config, &redis).await;
}

#[tokio::test]
async fn an_older_deployment_is_checked_and_persisted_postgres() {
    let redis = common::RedisServer::start();
    let pg = common::PgDatabase::create().await;
    let mut config = common::test_config(&redis.url());
    config.store.url = pg.url.clone();
    an_older_deployment_is_checked_and_persisted(config, &redis).await;
}

/// An older deployment whose Redis lost its data (no markers left) while the store holds
/// events of shard 12: 8 shards are refused by the store's events.
#[tokio::test]
async fn events_of_a_shard_past_the_count_are_refused() {
    let redis = common::RedisServer::start();
    let pg = common::PgDatabase::create().await;
    let mut config = common::test_config(&redis.url());
    config.store.url = pg.url.clone();
    config.settler.enabled = true;
    let server = common::TestServer::start(with_shards(&config, 16), Clock::Redis).await;
    let shard = server.ledger.shards().of_account("acct-1");
    assert_eq!(shard, 12);
    server
        .ledger
        .grant(&common::purchase("acct-1", 1_000, "g1"))
        .await
        .expect("grant");
    let store = Store::connect_lazy(&pg.url, 1).expect("store");
    common::eventually(Duration::from_secs(60), "the grant settled", || async {
        (store.count_events().await.unwrap_or(0) > 0).then_some(())
    })
    .await;
    server.stop().await;
    // As before the count was persisted, and Redis emptied.
    let mut con = redis
        .client()
        .get_multiplexed_async_connection()
        .await
        .expect("redis");
    let _: () = redis::cmd("FLUSHALL")
        .query_async(&mut con)
        .await
        .expect("FLUSHALL");
    let pool = sqlx::PgPool::connect(&pg.url).await.expect("pg");
    sqlx::query("DELETE FROM tollgate_shard_count")
        .execute(&pool)
        .await
        .expect("delete");
    pool.close().await;

    let refused = serve_refused(with_shards(&config, 8)).await;
    assert_names_counts(&refused, 8, "events of shard 12");
    assert_eq!(store.shard_count().await.expect("count"), None);
}

/// A redis-server in cluster mode, serving no slot yet (its node file a temp file).
fn cluster_node() -> common::RedisServer {
    let nodes = common::temp_path("conf");
    let nodes = nodes.to_str().expect("utf-8 temp path");
    common::RedisServer::start_with(&["--cluster-enabled", "yes", "--cluster-config-file", nodes])
}

/// A Redis Cluster node that does not serve every slot (here one with no slots yet) is
/// refused by `serve`, `settle` and `reconcile` with an error naming it, and nothing is
/// written to it. Without the check `serve` would start and keep asking (every key
/// command answers `CLUSTERDOWN`, or `MOVED` on a cluster of several primaries).
#[tokio::test]
async fn a_redis_in_cluster_mode_is_refused() {
    let redis = cluster_node();
    let config = common::test_config(&redis.url());
    let refused = serve_refused(config.clone()).await;
    assert!(refused.contains("Redis Cluster node"), "serve: {refused}");
    let refused = settle_refused(config.clone()).await;
    assert!(refused.contains("Redis Cluster node"), "settle: {refused}");
    let refused = tool_refused("reconcile", &config, config.ledger.shards);
    assert!(
        refused.contains("Redis Cluster node"),
        "reconcile: {refused}"
    );
    let mut con = redis
        .client()
        .get_multiplexed_async_connection()
        .await
        .expect("redis");
    let keys: i64 = redis::cmd("DBSIZE")
        .query_async(&mut con)
        .await
        .expect("DBSIZE");
    assert_eq!(keys, 0, "nothing was written to the cluster node");
}

/// A Redis user whose ACL denies `INFO` is not refused for it: whether Redis runs in
/// cluster mode is then not known, and tollgate starts and charges as before.
#[tokio::test]
async fn a_user_denied_info_still_starts() {
    let redis = common::RedisServer::start();
    let mut con = redis
        .client()
        .get_multiplexed_async_connection()
        .await
        .expect("redis");
    let _: () = redis::cmd("ACL")
        .arg("SETUSER")
        .arg("default")
        .arg("-info")
        .query_async(&mut con)
        .await
        .expect("ACL SETUSER");
    let denied: redis::RedisResult<String> = redis::cmd("INFO").query_async(&mut con).await;
    assert!(denied.is_err(), "INFO is denied: {denied:?}");
    let config = common::test_config(&redis.url());
    let server = common::TestServer::start(config, Clock::Redis).await;
    server
        .ledger
        .grant(&common::purchase("acct-1", 1_000, "g1"))
        .await
        .expect("grant");
    server.stop().await;
}

/// A cluster-mode Redis of one shard (one primary serving all 16384 slots, as a managed
/// Redis in cluster mode with a single shard is) is not refused: every call reaches the
/// node that serves its slot, and tollgate starts and charges on it.
#[tokio::test]
async fn a_cluster_mode_redis_of_one_shard_starts() {
    let redis = cluster_node();
    let mut con = redis
        .client()
        .get_multiplexed_async_connection()
        .await
        .expect("redis");
    let _: () = redis::cmd("CLUSTER")
        .arg("ADDSLOTSRANGE")
        .arg(0)
        .arg(16383)
        .query_async(&mut con)
        .await
        .expect("CLUSTER ADDSLOTSRANGE");
    let deadline = std::time::Instant::now() + REFUSAL_TIMEOUT;
    loop {
        let info: String = redis::cmd("CLUSTER")
            .arg("INFO")
            .query_async(&mut con)
            .await
            .expect("CLUSTER INFO");
        if info.lines().any(|line| line.trim() == "cluster_state:ok") {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the one-node cluster never came up: {info}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let config = common::test_config(&redis.url());
    let server = common::TestServer::start(config, Clock::Redis).await;
    server
        .ledger
        .grant(&common::purchase("acct-1", 1_000, "g1"))
        .await
        .expect("grant");
    server
        .ledger
        .grant(&common::purchase("acct-2", 500, "g2"))
        .await
        .expect("grant to a second account");
    server.stop().await;
}
