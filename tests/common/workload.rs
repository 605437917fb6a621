//! A workload that makes every kind of ledger event (grant, adjust ±, debit, hold,
//! capture, release, expire_hold, refund, expire_lot), driven by a manual clock.

use std::sync::atomic::{AtomicI64, Ordering};

use tollgate::ledger::{
    Adjust, Authorize, Debit, EndHold, Grant, Ledger, LotKind, Metadata, OnExpiry, Refund,
};

pub const ACCOUNTS: [&str; 4] = ["acme", "globex", "initech", "umbrella"];

/// Runs `rounds` rounds of every operation over the accounts; returns the acknowledged
/// event ids. `tag` keeps idempotency keys of different calls apart.
pub async fn every_kind(ledger: &Ledger, now: &AtomicI64, rounds: usize, tag: &str) -> Vec<String> {
    let mut acked = Vec::new();
    let at = || now.load(Ordering::SeqCst);
    for round in 0..rounds {
        for (i, account) in ACCOUNTS.iter().enumerate() {
            let key = |op: &str| format!("{tag}-{round}-{i}-{op}");
            // The expiring lot burns last (priority 90), so some of it is left to expire.
            let grant = |amount, expires_at_ms, op: &str| Grant {
                account_id: (*account).into(),
                wallet: "default".into(),
                amount,
                kind: LotKind::Purchase,
                priority: if expires_at_ms == 0 { 50 } else { 90 },
                expires_at_ms,
                description: "pack".into(),
                idempotency_key: key(op),
                metadata: Metadata::new(),
            };
            acked.push(
                ledger
                    .grant(&grant(500, 0, "g1"))
                    .await
                    .expect("grant")
                    .event_id,
            );
            acked.push(
                ledger
                    .grant(&grant(40, at() + 5_000, "g2"))
                    .await
                    .expect("grant")
                    .event_id,
            );
            let debit = ledger
                .debit(&Debit {
                    account_id: (*account).into(),
                    wallet: "default".into(),
                    amount: 30,
                    idempotency_key: key("d"),
                    operation: "envelope.send".into(),
                    metadata: [("doc".to_owned(), format!("{round}"))].into(),
                    member_id: String::new(),
                    price_inputs: None,
                    attempt_mark: None,
                })
                .await
                .expect("debit");
            acked.push(debit.event_id.clone());
            let refund = ledger
                .refund(&Refund {
                    charge_id: debit.event_id,
                    amount: 10,
                    idempotency_key: key("r"),
                    metadata: Metadata::new(),
                })
                .await
                .expect("refund");
            acked.push(refund.event_id);
            let hold = |amount, on_expiry, op: &str| Authorize {
                account_id: (*account).into(),
                wallet: "default".into(),
                amount,
                ttl_ms: 2_000,
                on_expiry,
                idempotency_key: key(op),
                operation: "ocr.pages".into(),
                metadata: Metadata::new(),
                member_id: String::new(),
                price_inputs: None,
                attempt_mark: None,
            };
            let h1 = ledger
                .authorize(&hold(50, OnExpiry::Release, "h1"))
                .await
                .expect("hold");
            acked.push(h1.event_id);
            let captured = ledger
                .end_hold(&EndHold::capture(h1.hold_id, Some(20), key("c1")))
                .await
                .expect("capture");
            acked.push(captured.event_id);
            let h2 = ledger
                .authorize(&hold(25, OnExpiry::Release, "h2"))
                .await
                .expect("hold");
            acked.push(h2.event_id);
            let released = ledger
                .end_hold(&EndHold::release(h2.hold_id, key("rel")))
                .await
                .expect("release");
            acked.push(released.event_id);
            // Left to expire: one captures, one releases.
            acked.push(
                ledger
                    .authorize(&hold(5, OnExpiry::Capture, "h3"))
                    .await
                    .expect("hold")
                    .event_id,
            );
            acked.push(
                ledger
                    .authorize(&hold(6, OnExpiry::Release, "h4"))
                    .await
                    .expect("hold")
                    .event_id,
            );
            for (amount, op) in [(15, "a+"), (-7, "a-")] {
                acked.push(
                    ledger
                        .adjust(&Adjust {
                            account_id: (*account).into(),
                            wallet: "default".into(),
                            amount,
                            priority: 50,
                            expires_at_ms: 0,
                            description: "fix".into(),
                            idempotency_key: key(op),
                            metadata: Metadata::new(),
                        })
                        .await
                        .expect("adjust")
                        .event_id,
                );
            }
        }
        // Past every hold deadline and the short lots' expiry: the sweeper's work.
        now.fetch_add(6_000, Ordering::SeqCst);
        super::sweep_all(ledger).await;
    }
    acked
}
