//! The sweeper ends overdue holds and expires lots of wallets nobody touches, so idle
//! accounts' balances (and the ledger) are right without waiting for their next request.
//! Every sidecar may run one: the sweep script is atomic, so concurrent sweepers only
//! share the work.

use std::sync::Arc;
use std::time::Duration;

use super::Ledger;

/// How often the sweeper visits every shard unless configured otherwise.
pub const DEFAULT_SWEEP_INTERVAL: Duration = Duration::from_secs(1);
/// Wallets one sweep call visits in one shard; more due wallets wait for the next call.
pub const SWEEP_WALLETS_PER_CALL_MAX: u32 = 128;
/// Lots expired plus holds ended by one sweep call, whatever the wallets: Redis runs
/// nothing else while the call runs. Ending a hold costs ~20 µs of Redis time (one call
/// ending 32,768 took 662 ms; 256 took 4.5–9 ms on a loaded 2-core test machine),
/// expiring a lot less, so this keeps a call to ~5 ms: no longer than a request that
/// meets a backlog of overdue holds (lua/lib.lua `DUE_HOLDS_MAX`, the same 256), and a
/// twentieth of the call deadline (`redis.call_timeout_ms`, 100 ms), which sweep calls
/// share with every other call: a sweep that outlives it means Redis is stalled, not that
/// the sweep needs longer.
pub const SWEEP_WORK_PER_CALL_MAX: u32 = 256;
/// Passes over the shards per round: each pass calls every shard that still has due work
/// once, so a shard with a backlog never holds up the others. A round thus ends at most
/// 64 × 256 lots and holds per shard; what is left waits for the next round.
pub const SWEEP_CALLS_PER_ROUND_MAX: u32 = 64;

/// One round over every shard. Returns the wallets visited.
pub async fn sweep_round(ledger: &Ledger) -> u64 {
    let mut visited = 0u64;
    let mut pending: Vec<u16> = (0..ledger.shards().count()).collect();
    for _ in 0..SWEEP_CALLS_PER_ROUND_MAX {
        if pending.is_empty() {
            break;
        }
        // The shards that still have due work after this pass.
        let mut more = Vec::new();
        for shard in pending {
            match ledger
                .sweep_shard(shard, SWEEP_WALLETS_PER_CALL_MAX, SWEEP_WORK_PER_CALL_MAX)
                .await
            {
                Ok(out) => {
                    visited += u64::from(out.wallets);
                    if out.more {
                        more.push(shard);
                    }
                }
                // Redis gone: the other shards would fail too.
                Err(err @ super::LedgerError::Unavailable(_)) => {
                    tracing::warn!(shard, error = %err, "sweep failed; retrying next round");
                    return visited;
                }
                // This shard's trouble (a script error on one wallet, say) must not keep
                // every later shard unswept; it is tried again next round.
                Err(err) => {
                    tracing::warn!(shard, error = %err, "sweep of a shard failed; the others go on");
                }
            }
        }
        pending = more;
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
