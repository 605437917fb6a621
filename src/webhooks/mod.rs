//! Usage webhooks: tell the provider's backend when a customer runs low.
//!
//! Driven from SETTLED ledger events, never from the hot path: the settler derives
//! deliveries from the events a batch newly writes to the store, in the same transaction
//! (so a delivery is never lost and never created twice), and the dispatcher POSTs them.
//!
//! - `rules`: which deliveries a wallet's events make (thresholds, crossings; pure)
//! - `signature`: the HMAC-SHA256 signature header
//! - `client`: the HTTP(S) client
//! - `dispatcher`: delivery in order per account, retries with capped backoff, leases so
//!   several dispatchers can run at once; at least once
//!
//! Events: `balance.low`, `balance.exhausted`, `lot.expiring`, `lot.expired`,
//! `grant.created`.

pub mod client;
pub mod dispatcher;
pub mod rules;
pub mod signature;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;

use crate::config::{redacted, ConfigError};
pub use rules::{Rules, Threshold, WebhookType};

pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);
/// Attempts before a delivery is given up (status "failed"; Admin RetryWebhookDelivery
/// sends it again, for up to as many attempts more). With the default backoff (1 s
/// doubling to an hour, each wait jittered to 50–100%) that is 9–18 hours of retrying,
/// about 13.6 on average.
pub const DEFAULT_ATTEMPTS_MAX: u32 = 30;
pub const DEFAULT_BACKOFF_MIN: Duration = Duration::from_secs(1);
pub const DEFAULT_BACKOFF_MAX: Duration = Duration::from_secs(3600);
/// How often the dispatcher looks for due deliveries and expiring lots.
pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_millis(500);
/// Accounts whose deliveries are in flight at once.
pub const DEFAULT_CONCURRENCY: usize = 16;
/// `lot.expiring` is sent this long before a lot expires.
pub const DEFAULT_LOT_EXPIRING_LEAD: Duration = Duration::from_secs(7 * 24 * 3600);
pub const TIMEOUT_MS_MAX: u64 = 60_000;
pub const CONCURRENCY_MAX: usize = 1024;
pub const ATTEMPTS_MAX_LIMIT: u32 = 1000;
/// A week: the longest wait between two attempts.
pub const BACKOFF_MS_MAX: u64 = 7 * 24 * 3600 * 1000;
/// An hour.
pub const POLL_INTERVAL_MS_MAX: u64 = 3600 * 1000;
/// A year ahead at most for `lot.expiring`.
pub const LOT_EXPIRING_LEAD_SECS_MAX: u64 = 365 * 24 * 3600;
pub const DEFAULT_DELIVERY_RETENTION_DAYS: u64 = 30;
/// Ten years.
pub const DELIVERY_RETENTION_DAYS_MAX: u64 = 3650;

/// The `[webhooks]` config section.
#[derive(Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct WebhookConfig {
    /// Endpoint deliveries are POSTed to (`http://` or `https://`); empty = webhooks off.
    pub url: String,
    /// HMAC-SHA256 key of the `x-tollgate-signature` header (required with `url`; set it
    /// from a secret: `TOLLGATE_WEBHOOKS__SECRET`).
    pub secret: String,
    /// A second key while a rotation rolls out (the one being replaced): each delivery
    /// then carries a signature by each, `v1=<current>,v1=<previous>`; empty = none.
    pub secret_previous: String,
    /// Event types to deliver; empty = all.
    pub events: Vec<String>,
    /// `balance.low` when available credits fall below this many (0 = no absolute bound).
    pub low_balance: i64,
    /// `balance.low` when available credits fall below this percent of the wallet's last
    /// grant (0 = off). With both set, the higher bound counts.
    pub low_balance_percent: u32,
    /// Thresholds per wallet name, overriding the two above (`[webhooks.wallets.esign]`).
    pub wallets: BTreeMap<String, WalletThresholdConfig>,
    /// `lot.expiring` is sent this long before a lot with credits left expires.
    pub lot_expiring_lead_secs: u64,
    /// Deadline of one delivery attempt.
    pub timeout_ms: u64,
    /// Attempts before a delivery is given up.
    pub attempts_max: u32,
    pub backoff_min_ms: u64,
    pub backoff_max_ms: u64,
    pub poll_interval_ms: u64,
    /// Accounts whose deliveries are in flight at once (each account's go one at a time).
    pub concurrency: usize,
    /// Delivered and failed deliveries are deleted this many days after their event
    /// (0 = kept for ever); pending ones are kept until they end.
    pub delivery_retention_days: u64,
}

impl std::fmt::Debug for WebhookConfig {
    /// Never prints the secret.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebhookConfig")
            // Neither: a webhook URL may carry a token too.
            .field("url", &redacted(&self.url))
            .field("secret", &redacted(&self.secret))
            .field("secret_previous", &redacted(&self.secret_previous))
            .field("events", &self.events)
            .field("low_balance", &self.low_balance)
            .field("low_balance_percent", &self.low_balance_percent)
            .field("wallets", &self.wallets)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct WalletThresholdConfig {
    pub low_balance: i64,
    pub low_balance_percent: u32,
}

impl Default for WebhookConfig {
    fn default() -> Self {
        Self {
            url: String::new(),
            secret: String::new(),
            secret_previous: String::new(),
            events: Vec::new(),
            low_balance: 0,
            low_balance_percent: 0,
            wallets: BTreeMap::new(),
            lot_expiring_lead_secs: DEFAULT_LOT_EXPIRING_LEAD.as_secs(),
            timeout_ms: DEFAULT_TIMEOUT.as_millis() as u64,
            attempts_max: DEFAULT_ATTEMPTS_MAX,
            backoff_min_ms: DEFAULT_BACKOFF_MIN.as_millis() as u64,
            backoff_max_ms: DEFAULT_BACKOFF_MAX.as_millis() as u64,
            poll_interval_ms: DEFAULT_POLL_INTERVAL.as_millis() as u64,
            concurrency: DEFAULT_CONCURRENCY,
            delivery_retention_days: DEFAULT_DELIVERY_RETENTION_DAYS,
        }
    }
}

/// Settings of the dispatcher, from the config.
#[derive(Clone)]
pub struct DispatchSettings {
    pub url: String,
    pub secret: String,
    /// Signs too, while a rotation rolls out; empty = none.
    pub secret_previous: String,
    pub timeout: Duration,
    pub attempts_max: u32,
    pub backoff_min: Duration,
    pub backoff_max: Duration,
    pub poll_interval: Duration,
    pub concurrency: usize,
    /// How long ended deliveries are kept (None: for ever).
    pub delivery_retention: Option<Duration>,
}

impl std::fmt::Debug for DispatchSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DispatchSettings")
            .field("timeout", &self.timeout)
            .field("attempts_max", &self.attempts_max)
            .finish_non_exhaustive()
    }
}

impl WebhookConfig {
    pub fn enabled(&self) -> bool {
        !self.url.is_empty()
    }

    /// The rules the settler applies, when webhooks are on.
    pub fn rules(&self) -> Option<Arc<Rules>> {
        if !self.enabled() {
            return None;
        }
        let mut subscribed = [self.events.is_empty(); WebhookType::ALL.len()];
        for name in &self.events {
            if let Some(t) = WebhookType::parse(name) {
                subscribed[t as usize] = true;
            }
        }
        Some(Arc::new(Rules {
            subscribed,
            default_threshold: Threshold {
                low_balance: self.low_balance,
                low_balance_percent: self.low_balance_percent,
            },
            wallet_thresholds: self
                .wallets
                .iter()
                .map(|(name, t)| {
                    (
                        name.clone(),
                        Threshold {
                            low_balance: t.low_balance,
                            low_balance_percent: t.low_balance_percent,
                        },
                    )
                })
                .collect(),
            lot_expiring_lead: Duration::from_secs(self.lot_expiring_lead_secs),
        }))
    }

    pub fn dispatch_settings(&self) -> Option<DispatchSettings> {
        self.enabled().then(|| DispatchSettings {
            url: self.url.clone(),
            secret: self.secret.clone(),
            secret_previous: self.secret_previous.clone(),
            timeout: Duration::from_millis(self.timeout_ms),
            attempts_max: self.attempts_max,
            backoff_min: Duration::from_millis(self.backoff_min_ms),
            backoff_max: Duration::from_millis(self.backoff_max_ms),
            poll_interval: Duration::from_millis(self.poll_interval_ms),
            concurrency: self.concurrency,
            delivery_retention: (self.delivery_retention_days > 0)
                .then(|| Duration::from_secs(self.delivery_retention_days * 24 * 3600)),
        })
    }

    /// Reports every bad setting with its path.
    pub fn validate(&self, errors: &mut Vec<ConfigError>) {
        let mut bad = |path: String, message: String| errors.push(ConfigError { path, message });
        if self.enabled() {
            match self.url.parse::<http::Uri>() {
                // The client sends no credentials of a URL's user part (hyper drops it),
                // so a receiver that relies on them would get every delivery
                // unauthenticated: refused rather than silently ignored.
                Ok(uri) if uri.authority().is_some_and(|a| a.as_str().contains('@')) => {
                    bad(
                        "webhooks.url".into(),
                        // Not echoed: the user part holds a password.
                        "must not carry credentials (user:password@): deliveries are signed \
                         with webhooks.secret; put a token in the path or query instead"
                            .into(),
                    )
                }
                Ok(uri)
                    if matches!(uri.scheme_str(), Some("http") | Some("https"))
                        && uri.host().is_some() => {}
                _ => bad(
                    "webhooks.url".into(),
                    // Not echoed: a webhook URL may carry a token.
                    "is not an http:// or https:// url".into(),
                ),
            }
            if self.secret.is_empty() {
                bad(
                    "webhooks.secret".into(),
                    "must be set when webhooks.url is (TOLLGATE_WEBHOOKS__SECRET)".into(),
                );
            }
            // A Kubernetes Secret made with --from-file keeps the file's newline: the
            // HMAC key would then differ from the secret the receiver was given, and
            // every delivery would fail its signature check until it gave up.
            for (path, secret) in [
                ("webhooks.secret", &self.secret),
                ("webhooks.secret_previous", &self.secret_previous),
            ] {
                if secret.trim() != secret.as_str() {
                    bad(
                        path.into(),
                        "must not begin or end with whitespace (a trailing newline?)".into(),
                    );
                }
            }
        }
        if self.secret.is_empty() && !self.secret_previous.is_empty() {
            bad(
                "webhooks.secret_previous".into(),
                "is set without webhooks.secret (the previous key only signs next to the \
                 current one, during a rotation)"
                    .into(),
            );
        }
        for name in &self.events {
            if WebhookType::parse(name).is_none() {
                bad(
                    "webhooks.events".into(),
                    format!(
                        "unknown event {name:?}: use {}",
                        WebhookType::ALL.map(|t| t.as_str()).join(", ")
                    ),
                );
            }
        }
        let mut threshold = |path: &str, low_balance: i64, percent: u32| {
            if !(0..=crate::ledger::command::CREDITS_MAX).contains(&low_balance) {
                bad(
                    format!("{path}low_balance"),
                    "must be 0 (off) or a number of credits".into(),
                );
            }
            if percent > 100 {
                bad(
                    format!("{path}low_balance_percent"),
                    "must be in 0..=100".into(),
                );
            }
        };
        threshold("webhooks.", self.low_balance, self.low_balance_percent);
        for (name, t) in &self.wallets {
            threshold(
                &format!("webhooks.wallets.{name}."),
                t.low_balance,
                t.low_balance_percent,
            );
        }
        let mut bad = |path: &str, message: String| {
            errors.push(ConfigError {
                path: path.into(),
                message,
            })
        };
        if !(1..=TIMEOUT_MS_MAX).contains(&self.timeout_ms) {
            bad(
                "webhooks.timeout_ms",
                format!("must be in 1..={TIMEOUT_MS_MAX}"),
            );
        }
        if !(1..=ATTEMPTS_MAX_LIMIT).contains(&self.attempts_max) {
            bad(
                "webhooks.attempts_max",
                format!("must be in 1..={ATTEMPTS_MAX_LIMIT}"),
            );
        }
        if !(1..=CONCURRENCY_MAX).contains(&self.concurrency) {
            bad(
                "webhooks.concurrency",
                format!("must be in 1..={CONCURRENCY_MAX}"),
            );
        }
        // Bounded above too: a huge value would overflow the millisecond times made from
        // it (a backoff into the past retries at once; a lead that wraps never announces).
        for (path, value, max) in [
            (
                "webhooks.backoff_min_ms",
                self.backoff_min_ms,
                BACKOFF_MS_MAX,
            ),
            (
                "webhooks.backoff_max_ms",
                self.backoff_max_ms,
                BACKOFF_MS_MAX,
            ),
            (
                "webhooks.poll_interval_ms",
                self.poll_interval_ms,
                POLL_INTERVAL_MS_MAX,
            ),
            (
                "webhooks.lot_expiring_lead_secs",
                self.lot_expiring_lead_secs,
                LOT_EXPIRING_LEAD_SECS_MAX,
            ),
        ] {
            if !(1..=max).contains(&value) {
                bad(path, format!("must be in 1..={max}"));
            }
        }
        if self.delivery_retention_days > DELIVERY_RETENTION_DAYS_MAX {
            bad(
                "webhooks.delivery_retention_days",
                format!("must be in 0..={DELIVERY_RETENTION_DAYS_MAX} (0 keeps them)"),
            );
        }
        if self.backoff_max_ms < self.backoff_min_ms {
            bad(
                "webhooks.backoff_max_ms",
                "must not be less than webhooks.backoff_min_ms".into(),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_settings_are_reported_with_paths() {
        let mut config = WebhookConfig {
            url: "ftp://x".into(),
            events: vec!["balance.low".into(), "balance.gone".into()],
            low_balance: -1,
            low_balance_percent: 101,
            timeout_ms: 0,
            backoff_min_ms: 10,
            backoff_max_ms: 5,
            poll_interval_ms: u64::MAX,
            lot_expiring_lead_secs: 0,
            ..WebhookConfig::default()
        };
        config.wallets.insert(
            "esign".into(),
            WalletThresholdConfig {
                low_balance: 0,
                low_balance_percent: 200,
            },
        );
        let mut errors = Vec::new();
        config.validate(&mut errors);
        let paths: Vec<&str> = errors.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "webhooks.url",
                "webhooks.secret",
                "webhooks.events",
                "webhooks.low_balance",
                "webhooks.low_balance_percent",
                "webhooks.wallets.esign.low_balance_percent",
                "webhooks.timeout_ms",
                "webhooks.poll_interval_ms",
                "webhooks.lot_expiring_lead_secs",
                "webhooks.backoff_max_ms",
            ]
        );
    }

    #[test]
    fn credentials_in_the_url_and_a_padded_secret_are_refused_without_echoing_them() {
        let config = WebhookConfig {
            url: "https://user:pa55word@billing.example.com/hook".into(),
            secret: "s3cret\n".into(),
            ..WebhookConfig::default()
        };
        let mut errors = Vec::new();
        config.validate(&mut errors);
        let paths: Vec<&str> = errors.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(paths, ["webhooks.url", "webhooks.secret"], "{errors:?}");
        let shown = format!("{errors:?}");
        assert!(
            !shown.contains("pa55word") && !shown.contains("s3cret"),
            "{shown}"
        );
        // A token in the path or query is fine.
        let config = WebhookConfig {
            url: "https://billing.example.com/hook/t0ken?key=a@b".into(),
            secret: "s3cret".into(),
            ..WebhookConfig::default()
        };
        let mut errors = Vec::new();
        config.validate(&mut errors);
        assert!(errors.is_empty(), "{errors:?}");
    }

    #[test]
    fn rules_follow_the_config() {
        assert!(WebhookConfig::default().rules().is_none());
        let config = WebhookConfig {
            url: "http://127.0.0.1:9/hook".into(),
            secret: "s".into(),
            events: vec!["balance.low".into()],
            ..WebhookConfig::default()
        };
        let mut errors = Vec::new();
        config.validate(&mut errors);
        assert!(errors.is_empty(), "{errors:?}");
        let rules = config.rules().unwrap();
        assert!(rules.subscribed(WebhookType::BalanceLow));
        assert!(!rules.subscribed(WebhookType::GrantCreated));
        assert!(!format!("{config:?}").contains("\"s\""));
    }
}
