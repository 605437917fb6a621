//! Settlement: every ledger event leaves Redis's outbox streams for the durable store,
//! exactly once, and the store can prove it (reconcile).
//!
//! - `store`: PostgreSQL / SQLite, events keyed by event id, per-wallet running summaries
//! - `settler`: the consumer group over the shard outboxes (batches, ack after commit,
//!   reclaim of dead consumers' batches, trimming)
//! - `reconcile`: compares the store with Redis's live state
//! - `restore`: rebuilds Redis's live state from the store after Redis lost its data
//! - `webhook_store`: usage-webhook state and deliveries in the same store (schema v2)
//! - `dead_letters`: the outbox entries the settler set aside: list, replay, drop
//! - `shard_count`: the persisted shard count, and the check that refuses another one

pub mod dead_letters;
pub mod reconcile;
pub mod restore;
pub mod settler;
pub mod shard_count;
pub mod store;
pub mod webhook_store;

pub use store::{Store, StoreError};
