//! The sweeper ends overdue holds and expires lots of wallets nobody touches, so idle
//! accounts' balances (and the ledger) are right without waiting for their next request.
//! Every sidecar may run one: the sweep script is atomic, so concurrent sweepers only
//! share the work.

use std::sync::Arc;
use std::time::Duration;

use super::Ledger;

/// How often the sweeper visits every shard unless configured otherwise.
pub const DEFAULT_SWEEP_INTERVAL: Duration = Duration::from_secs(1);
/// Wallets one sweep call visits in one shard; more due wallets wait for the next round
/// (the call runs inside Redis, so it must stay short).
pub const SWEEP_WALLETS_PER_CALL_MAX: u32 = 128;
/// Calls per shard per round, so one round is bounded too.
pub const SWEEP_CALLS_PER_ROUND_MAX: u32 = 64;

/// One round over every shard. Returns the wallets visited.
pub async fn sweep_round(ledger: &Ledger) -> u64 {
    let mut visited = 0u64;
    for shard in 0..ledger.shards().count() {
        for _ in 0..SWEEP_CALLS_PER_ROUND_MAX {
            match ledger.sweep_shard(shard, SWEEP_WALLETS_PER_CALL_MAX).await {
                Ok(n) => {
                    visited += u64::from(n);
                    if n < SWEEP_WALLETS_PER_CALL_MAX {
                        break;
                    }
                }
                // Redis gone: the other shards would fail too.
                Err(err @ super::LedgerError::Unavailable(_)) => {
                    tracing::warn!(shard, error = %err, "sweep failed; retrying next round");
                    return visited;
                }
                // This shard's trouble (a script error on one wallet, say) must not keep
                // every later shard unswept.
                Err(err) => {
                    tracing::warn!(shard, error = %err, "sweep of a shard failed; the others go on");
                    break;
                }
            }
        }
    }
    visited
}

/// Runs rounds every `interval` until `shutdown` resolves.
pub async fn run(ledger: Arc<Ledger>, interval: Duration, shutdown: impl std::future::Future) {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => return,
            _ = ticker.tick() => {
                let visited = sweep_round(&ledger).await;
                if visited > 0 {
                    tracing::debug!(visited, "sweep round");
                }
            }
        }
    }
}
