//! The operator tools (`reconcile`, `end-lost-hold`, `restore`, `dead-letters replay`)
//! write into none but a store `serve` or `settle` made: against a SQLite file that does
//! not exist (the default `sqlite://tollgate.db` of a tool run from another directory, or
//! a mistyped path), an empty PostgreSQL database or an empty schema, each is refused
//! naming the store, creates no file and no table, and leaves the outbox unsettled, so a
//! later drain into the real store still gets every event.

mod common;

use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::Arc;

use tollgate::config::url_for_logs;
use tollgate::ledger::{Clock, Ledger};
use tollgate::settle::Store;

/// bob granted 100 credits; the grant's event is in its shard's outbox, unsettled (as in
/// a `serve` whose settler is disabled). The same event is also planted as a dead letter
/// (the fields the settler writes: `id`, `error`, then the entry's own) for `dead-letters
/// replay`. Returns the ledger, bob's shard and the dead letter's id.
async fn bob_granted(redis: &common::RedisServer) -> (Arc<Ledger>, u16, String) {
    let ledger = common::ledger(redis, Clock::Redis);
    ledger
        .grant(&common::purchase("bob", 100, "grant-bob"))
        .await
        .expect("grant");
    let shard = ledger.shards().of_account("bob");
    let entries = common::outbox_entries(&ledger, shard).await;
    let [redis::Value::Array(entry)] = entries.as_slice() else {
        panic!("one outbox entry: {entries:?}")
    };
    let (Some(redis::Value::BulkString(id)), Some(redis::Value::Array(fields))) =
        (entry.first(), entry.get(1))
    else {
        panic!("an outbox entry: {entry:?}")
    };
    let dead = tollgate::settle::restore::dead_letters_key(ledger.shards().outbox(shard));
    let mut xadd = redis::cmd("XADD");
    xadd.arg(&dead)
        .arg("*")
        .arg("id")
        .arg(id.as_slice())
        .arg("error")
        .arg("planted");
    for field in fields {
        if let redis::Value::BulkString(bytes) = field {
            xadd.arg(bytes.as_slice());
        }
    }
    let dead_id: String = ledger
        .redis()
        .query(&xadd)
        .await
        .expect("plant dead letter");
    (ledger, shard, dead_id)
}

/// Every tool that opens the store, with `--redis-url` and, when given, `--store`.
fn tools(redis_url: &str, store: Option<&str>, shard: u16, dead_id: &str) -> Vec<Vec<String>> {
    let mut target = vec!["--redis-url".to_owned(), redis_url.to_owned()];
    if let Some(store) = store {
        target.extend(["--store".to_owned(), store.to_owned()]);
    }
    let args = |head: &[&str], tail: &[&str]| -> Vec<String> {
        head.iter()
            .map(|s| s.to_string())
            .chain(target.iter().cloned())
            .chain(tail.iter().map(|s| s.to_string()))
            .collect()
    };
    let shard = shard.to_string();
    vec![
        args(&["reconcile"], &["--drain-timeout-secs", "120"]),
        args(
            &["end-lost-hold", "bob", "default", "h0-1"],
            &["--drain-timeout-secs", "120"],
        ),
        args(&["dead-letters"], &["replay", &shard, dead_id]),
        args(&["dead-letters"], &["replay", &shard, dead_id, "--dry-run"]),
        args(&["restore"], &[]),
    ]
}

fn run(dir: &Path, args: &[String]) -> Output {
    common::output_within(
        common::tollgate().current_dir(dir).args(args),
        common::COMMAND_TIMEOUT,
    )
}

/// Refused: a non-zero exit whose message names the store and says to pass `--store`.
fn assert_refused(out: &Output, args: &[String], store: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{args:?} ran: {out:?}");
    assert!(
        stderr.contains(&format!("the store {store} is not a tollgate store"))
            && stderr.contains("--store"),
        "{args:?}: the error names {store} and --store: {stderr}"
    );
}

/// Bob's grant is still in the outbox, and its dead letter still there (that it was not
/// acknowledged either shows when the real store gets it: `assert_drained_into`).
async fn assert_unsettled(ledger: &Ledger, shard: u16) {
    assert_eq!(
        common::outbox_len(ledger).await,
        1,
        "the outbox entry stays"
    );
    let pending = common::pending(ledger, tollgate::settle::settler::DEFAULT_GROUP, None).await;
    assert!(
        matches!(pending, None | Some(0)),
        "nothing left pending in the settler group: {pending:?}"
    );
    let dead = tollgate::settle::restore::dead_letters_key(ledger.shards().outbox(shard));
    let dead_letters: i64 = ledger
        .redis()
        .query(redis::cmd("XLEN").arg(dead))
        .await
        .expect("xlen");
    assert_eq!(dead_letters, 1, "the dead letter stays");
}

/// What `serve` and `settle` do at start-up: the real store, migrated.
async fn real_store(url: &str) -> Store {
    let store = Store::connect_lazy(url, 2).expect("store url");
    store.migrate().await.expect("migrate");
    store
}

/// `reconcile` into the real store drains bob's grant there, and agrees.
fn assert_drained_into(dir: &Path, redis_url: &str, store: &str) {
    let args: Vec<String> = [
        "reconcile",
        "--redis-url",
        redis_url,
        "--store",
        store,
        "--drain-timeout-secs",
        "120",
    ]
    .map(String::from)
    .to_vec();
    let out = run(dir, &args);
    assert!(
        out.status.success(),
        "reconcile into the real store: {out:?}"
    );
    assert!(
        String::from_utf8_lossy(&out.stdout)
            .contains("reconciled 1 wallets, 1 ledger events: 0 drift(s)"),
        "{out:?}"
    );
}

fn empty_dir() -> PathBuf {
    let dir = common::temp_path("dir");
    std::fs::create_dir_all(&dir).expect("dir");
    dir
}

fn files_in(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .expect("read dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tools_refuse_a_sqlite_store_that_does_not_exist() {
    let redis = common::RedisServer::start();
    let (ledger, shard, dead_id) = bob_granted(&redis).await;
    // Run from an empty directory: the default store is ./tollgate.db, which is not there.
    let dir = empty_dir();
    let missing = format!("sqlite://{}", dir.join("mistyped.db").display());
    for (store, named) in [(None, "sqlite://tollgate.db"), (Some(&missing), &missing)] {
        for args in tools(&redis.url(), store.map(String::as_str), shard, &dead_id) {
            let out = run(&dir, &args);
            assert_refused(&out, &args, named);
            assert_eq!(files_in(&dir), Vec::<String>::new(), "{args:?} made a file");
        }
    }
    assert_unsettled(&ledger, shard).await;

    // The store `serve` and `settle` use still gets the event.
    let real_url = common::temp_sqlite_url();
    let real = real_store(&real_url).await;
    assert_drained_into(&dir, &redis.url(), &real_url);
    assert_eq!(real.count_events().await.expect("count"), 1);
}

/// The tables of a PostgreSQL schema.
async fn tables(con: &mut sqlx::PgConnection, schema: &str) -> Vec<String> {
    sqlx::query_scalar(
        "SELECT CAST(table_name AS TEXT) FROM information_schema.tables WHERE table_schema = $1",
    )
    .bind(schema)
    .fetch_all(con)
    .await
    .expect("tables")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tools_refuse_an_empty_postgres_database_or_schema() {
    use sqlx::Connection;
    let redis = common::RedisServer::start();
    let (ledger, shard, dead_id) = bob_granted(&redis).await;
    let dir = empty_dir();
    let pg = common::PgDatabase::create().await;
    let mut con = sqlx::PgConnection::connect(&pg.url).await.expect("connect");

    // A database nothing migrated.
    for args in tools(&redis.url(), Some(&pg.url), shard, &dead_id) {
        let out = run(&dir, &args);
        assert_refused(&out, &args, &url_for_logs(&pg.url));
        assert_eq!(
            tables(&mut con, "public").await,
            Vec::<String>::new(),
            "{args:?}"
        );
    }
    assert_unsettled(&ledger, shard).await;

    // The database is tollgate's (public migrated), the schema named is another, empty.
    let real = real_store(&pg.url).await;
    sqlx::raw_sql("CREATE SCHEMA mistyped")
        .execute(&mut con)
        .await
        .expect("create schema");
    let mistyped = format!("{}?options=-c%20search_path%3Dmistyped", pg.url);
    for args in tools(&redis.url(), Some(&mistyped), shard, &dead_id) {
        let out = run(&dir, &args);
        assert_refused(&out, &args, &url_for_logs(&pg.url));
        assert_eq!(
            tables(&mut con, "mistyped").await,
            Vec::<String>::new(),
            "{args:?}"
        );
    }
    assert_unsettled(&ledger, shard).await;
    assert_eq!(files_in(&dir), Vec::<String>::new());

    assert_drained_into(&dir, &redis.url(), &pg.url);
    assert_eq!(real.count_events().await.expect("count"), 1);
}

/// A Redis that lost its data, restored from a store that does not exist: refused, and
/// no shard marked serving (read as an empty ledger, every shard would be, empty).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_from_a_store_that_does_not_exist_marks_no_shard() {
    let redis = common::RedisServer::start();
    // No epoch marker: every shard lost (or never had) its data.
    let ledger =
        tollgate::server::ledger_from_config(&common::test_config(&redis.url()), Clock::Redis)
            .expect("ledger");
    let dir = empty_dir();
    let missing = format!("sqlite://{}", dir.join("ledger.db").display());
    let args: Vec<String> = ["restore", "--redis-url", &redis.url(), "--store", &missing]
        .map(String::from)
        .to_vec();
    let out = run(&dir, &args);
    assert_refused(&out, &args, &missing);
    assert_eq!(files_in(&dir), Vec::<String>::new());
    assert_eq!(
        ledger.initialized_shards().await.expect("markers"),
        vec![false; usize::from(ledger.shards().count())],
        "no shard marked serving"
    );
}
