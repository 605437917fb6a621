//! The deployment's shard count (`ledger.shards`) is fixed for its life: an account's
//! shard is a hash of its id modulo the count, so another count puts most accounts on
//! other shards (their wallets, keys and holds not found there, new wallets made beside
//! the old ones; a smaller count leaves the outboxes, holds and lots of the shards past it
//! unsettled and unswept). Tollgate does not migrate a ledger between counts.
//!
//! So the count is persisted where every process sees it, and [`check`] refuses a process
//! configured with another one (`serve`, `settle`, `reconcile`, `restore`, `end-lost-hold`,
//! `dead-letters replay` but for its dry run):
//! - in Redis, in every shard: `{tg:S}:shards` = the count, written in the same atomic
//!   step as the shard's epoch marker (`Ledger::mark_new_shard`, `Ledger::initialize_shard`,
//!   a restore's last step), so a shard is never marked for another count;
//! - in the store: `tollgate_shard_count` (schema_v10.sql), written by the first process.
//!
//! A deployment made before the count was persisted has neither: the first start persists
//! its configured count unless what is there contradicts it. What is detected then: epoch
//! markers of shards at or past the count, or events in the store of such a shard (the
//! count shrank); epoch markers that exist only below a shard number under the count (the
//! count grew: every shard of a deployment is marked, so the highest marker is its last
//! shard). Not detected: a grown count whose Redis lost its data (no markers left) while
//! the store holds events only of shards under the old count; a count changed while Redis
//! lost its highest shards' markers reads as grown (refused, on the safe side).
//!
//! The same check refuses a Redis Cluster node that does not serve every slot
//! ([`ShardCountError::RedisCluster`]): this process reads every shard's keys through one
//! connection to one node.

use crate::ledger::{Ledger, LedgerError};
use crate::settle::{Store, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum ShardCountError {
    /// The count persisted in Redis or the store differs from the configured one.
    #[error(
        "ledger.shards is {configured}, but this deployment's shard count is {persisted} \
         (persisted in {place}): the count is fixed for a deployment's life (an account's \
         shard is a hash of its id modulo the count) and tollgate does not migrate a ledger \
         to another; set ledger.shards to {persisted}"
    )]
    Mismatch {
        configured: u16,
        persisted: String,
        place: &'static str,
    },
    /// Data written before the count was persisted contradicts the configured count.
    #[error(
        "ledger.shards is {configured}, but {found}: this deployment's shard count is \
         {persisted}; the count is fixed for a deployment's life and tollgate does not \
         migrate a ledger to another; set ledger.shards to {persisted}"
    )]
    Contradicted {
        configured: u16,
        persisted: String,
        found: String,
    },
    /// The Redis at `redis.url` is a node of a Redis Cluster of several primaries (or
    /// one that does not serve every slot), which this version does not speak
    /// (`Ledger::redis_cluster_unsupported`): refused before anything is read or written.
    #[error(
        "the Redis at redis.url is a Redis Cluster node that does not serve every slot \
         (INFO cluster: cluster_enabled:1): tollgate speaks to one Redis primary (with \
         replicas and failover, docs/OPERATIONS.md; a cluster-mode Redis of one shard is \
         fine) and does not support Redis Cluster with several primaries; point redis.url \
         at a primary that serves every slot"
    )]
    RedisCluster,
    /// Redis did not answer: nothing is known yet.
    #[error("cannot check ledger.shards against the deployment's shard count: Redis: {0}")]
    Redis(#[from] LedgerError),
    /// The store did not answer (or failed): Redis showed nothing against the count, the
    /// store is not known yet.
    #[error("cannot check ledger.shards against the deployment's shard count: the store: {0}")]
    Store(#[from] StoreError),
}

impl ShardCountError {
    /// Whether asking again later may succeed (Redis or the store failed), rather than a
    /// count that differs.
    pub fn is_transient(&self) -> bool {
        matches!(self, Self::Redis(_) | Self::Store(_))
    }
}

/// Checks the configured shard count against what Redis and the store hold, and persists
/// it where it is missing (a fresh deployment, or one made before it was persisted).
/// Migrates the store (the count's table is schema version 10).
pub async fn check(ledger: &Ledger, store: &Store) -> Result<(), ShardCountError> {
    let configured = ledger.shards().count();
    let mismatch = |persisted: String, place| ShardCountError::Mismatch {
        configured,
        persisted,
        place,
    };
    // A cluster node would answer each shard's keys from another node (MOVED): what
    // this process read of them would not be the deployment's.
    match ledger.redis_cluster_unsupported().await {
        Ok(true) => return Err(ShardCountError::RedisCluster),
        Ok(false) => {}
        Err(err @ LedgerError::Unavailable(_)) => return Err(err.into()),
        // A user whose ACL denies INFO: not known, and not a reason to refuse.
        Err(err) => {
            tracing::warn!(error = %err, "could not ask Redis whether it runs in cluster mode")
        }
    }
    // Redis first: what it holds refuses another count even while the store is down.
    let marks = ledger.shard_count_marks().await?;
    if let Some(found) = marks
        .iter()
        .filter_map(|(_, c)| c.as_deref())
        .find(|c| *c != configured.to_string())
    {
        return Err(mismatch(found.to_owned(), "Redis"));
    }
    let highest_marker = marks.iter().rposition(|(marked, _)| *marked);
    if let Some(highest) = highest_marker.filter(|h| *h >= usize::from(configured)) {
        return Err(ShardCountError::Contradicted {
            configured,
            persisted: format!("at least {}", highest + 1),
            found: format!("Redis has the epoch marker of shard {highest}"),
        });
    }
    store.migrate().await?;
    let persisted = store.shard_count().await?;
    if let Some(persisted) = persisted.filter(|p| *p != i64::from(configured)) {
        return Err(mismatch(persisted.to_string(), "the store"));
    }
    if let Some(highest) = store.highest_event_shard().await? {
        if highest >= i64::from(configured) {
            return Err(ShardCountError::Contradicted {
                configured,
                persisted: format!("at least {}", highest + 1),
                found: format!("the store holds events of shard {highest}"),
            });
        }
    }
    // Before the count was persisted (neither the store nor any shard holds it): every
    // shard of a deployment has its marker, so markers that stop short of the configured
    // count say the count grew.
    let legacy = persisted.is_none() && marks.iter().all(|(_, c)| c.is_none());
    if let Some(highest) = highest_marker.filter(|h| legacy && h + 1 < usize::from(configured)) {
        return Err(ShardCountError::Contradicted {
            configured,
            persisted: format!("probably {}", highest + 1),
            found: format!(
                "Redis has epoch markers only up to shard {highest}, and no persisted \
                 shard count (every shard of a deployment has its marker)"
            ),
        });
    }
    // Nothing contradicts it: persist it, then read back what won (a process with
    // another count starting at the same moment shows up here, and one of the two, at
    // least, refuses).
    let stored = store.persist_shard_count(configured).await?;
    if stored != i64::from(configured) {
        return Err(mismatch(stored.to_string(), "the store"));
    }
    for found in ledger.persist_shard_count().await?.into_iter().flatten() {
        if found != configured.to_string() {
            return Err(mismatch(found, "Redis"));
        }
    }
    Ok(())
}
