//! Command line: `serve`, `bench` and the admin commands for people (which talk to a running
//! server over gRPC).

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::config::{DEFAULT_GRPC_ADDR, DEFAULT_HTTP_ADDR};

#[derive(Debug, Parser)]
#[command(
    name = "tollgate",
    version,
    about = "Credit-metering sidecar for API gateways"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the gRPC and HTTP servers and the sweeper.
    Serve(ServeArgs),
    /// Run a settler alone (outbox → durable store), with /healthz, /readyz, /metrics.
    Settle(SettleArgs),
    /// Drain the outbox, then compare the durable ledger with Redis; exits 1 on drift.
    Reconcile(ReconcileArgs),
    /// Rebuild Redis's live state from the durable ledger (after Redis lost its data).
    Restore(RestoreArgs),
    /// End a hold the ledger has open whose record Redis lost (reconcile names them): its
    /// record is written again from its hold event, then it is released (or ended by its
    /// on_expiry policy once past its deadline).
    EndLostHold(EndLostHoldArgs),
    /// Outbox entries the settler could not read and set aside: list them, replay one into
    /// the store (with fields corrected by hand), or drop one.
    DeadLetters(DeadLettersArgs),
    /// Back-office commands against a running server.
    Admin(AdminArgs),
    /// Delete the Redis function libraries earlier tollgate versions loaded (after a
    /// rolling upgrade); this version's library stays.
    PruneFunctions(PruneFunctionsArgs),
    /// Validate a config file (with the TOLLGATE_ environment) as `serve` would, tokens
    /// included, without starting anything; exits 1 and lists every bad setting if it is
    /// invalid.
    CheckConfig(CheckConfigArgs),
    /// Load generator: check, debit, hold or forward-auth, optionally against a raw-Redis
    /// baseline measured in the same run.
    Bench(crate::bench::BenchArgs),
}

#[derive(Debug, Args)]
pub struct CheckConfigArgs {
    /// Config file (TOML); default ./tollgate.toml when it exists.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Check it as `serve --dev` would run it: the dev tokens stand in for missing ones.
    #[arg(long)]
    pub dev: bool,
}

#[derive(Debug, Args)]
pub struct PruneFunctionsArgs {
    #[arg(long)]
    pub config: Option<PathBuf>,
    #[arg(long)]
    pub redis_url: Option<String>,
    /// Only list what would be deleted.
    #[arg(long)]
    pub dry_run: bool,
    /// Prune even when this version's own library is not in Redis (by default that is
    /// refused: the others are then probably the ones in use).
    #[arg(long)]
    pub force: bool,
}

#[derive(Debug, Args)]
pub struct DeadLettersArgs {
    #[command(flatten)]
    pub target: ToolTarget,
    #[command(subcommand)]
    pub command: DeadLettersCommand,
}

#[derive(Debug, Subcommand)]
pub enum DeadLettersCommand {
    /// Every dead letter, one line each: shard, dead-letter id, outbox entry id, why, fields.
    List,
    /// Write one into the store as the event it was, under its original event id, then
    /// delete it (Redis applied it already; reconcile shows the drift it closes).
    Replay {
        shard: u16,
        /// Its id in the dead-letter stream (the `dead` column of `list`).
        dead_id: String,
        /// Replace (or add) a field before replaying, e.g. `--set n=5`; repeatable.
        #[arg(long = "set", value_name = "FIELD=VALUE", value_parser = field_value)]
        set: Vec<(String, String)>,
        /// Only show the event it would write.
        #[arg(long)]
        dry_run: bool,
    },
    /// Delete one without replaying it: the only copy of an event Redis applied, so only
    /// with --force.
    Drop {
        shard: u16,
        dead_id: String,
        /// Yes, delete it for good (the store will never have that event).
        #[arg(long)]
        force: bool,
    },
}

/// An optional value that, when given, must say something (`--idempotency-key ''` is a
/// mistake, not "no key").
fn non_empty(s: &str) -> Result<String, String> {
    if s.is_empty() {
        Err("must not be empty".to_owned())
    } else {
        Ok(s.to_owned())
    }
}

fn field_value(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
        _ => Err(format!("{s:?} is not FIELD=VALUE")),
    }
}

#[derive(Debug, Args)]
pub struct RestoreArgs {
    #[command(flatten)]
    pub target: ToolTarget,
    /// Also restore shards that do not serve but hold data of unknown origin (what a restore
    /// that died partway left is redone without it): what they hold is deleted first, unsettled outbox entries with it. Shards
    /// that serve are never touched.
    #[arg(long, conflicts_with = "rebuild_serving")]
    pub force: bool,
    /// Rebuild every shard from the store, serving ones too (Redis came back behind the
    /// store). Refused unless the settler has settled every outbox entry; stop the
    /// sidecars first.
    #[arg(long)]
    pub rebuild_serving: bool,
}

#[derive(Debug, Args)]
pub struct ReconcileArgs {
    #[command(flatten)]
    pub target: ToolTarget,
    /// How long to wait for the outbox to drain (1..=86400).
    #[arg(long, default_value_t = 120, value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub drain_timeout_secs: u64,
}

/// Where an operator's command works: the deployment's config, Redis and durable store.
#[derive(Debug, Args)]
pub struct ToolTarget {
    /// Config file (TOML); default ./tollgate.toml when it exists.
    #[arg(long, global = true)]
    pub config: Option<PathBuf>,
    #[arg(long, global = true)]
    pub redis_url: Option<String>,
    /// Durable store: postgres://… or sqlite://PATH.
    #[arg(long, global = true)]
    pub store: Option<String>,
}

#[derive(Debug, Args)]
pub struct EndLostHoldArgs {
    pub account: String,
    pub wallet: String,
    pub hold_id: String,
    #[command(flatten)]
    pub target: ToolTarget,
    /// How long to wait for the outbox to drain (1..=86400).
    #[arg(long, default_value_t = 120, value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub drain_timeout_secs: u64,
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Config file (TOML); default ./tollgate.toml when it exists.
    #[arg(long)]
    pub config: Option<PathBuf>,
    #[arg(long)]
    pub redis_url: Option<String>,
    // The defaults are the config's, not clap's (a clap default would override the
    // file and the environment): shown in the help text only.
    #[arg(long, value_name = "ADDR", help = listen_help("gRPC", "grpc_addr", DEFAULT_GRPC_ADDR))]
    pub grpc_addr: Option<String>,
    #[arg(long, value_name = "ADDR", help = listen_help("HTTP (forward-auth, /healthz, /readyz, /metrics)", "http_addr", DEFAULT_HTTP_ADDR))]
    pub http_addr: Option<String>,
    /// Durable store: postgres://… or sqlite://PATH (default sqlite://tollgate.db).
    #[arg(long)]
    pub store: Option<String>,
    /// Local development: starts a private redis-server and uses dev tokens.
    #[arg(long)]
    pub dev: bool,
    /// If Redis holds no ledger but the store has events (Redis lost its data), run
    /// `tollgate restore` before serving, and again in the background whenever Redis loses
    /// shards while serving (`server.restore = true`).
    #[arg(long)]
    pub restore: bool,
}

/// Help for a listen-address flag: what it overrides, and the built-in default.
fn listen_help(what: &str, setting: &str, default: &str) -> String {
    format!(
        "{what} listen address; overrides server.{setting} (config file, TOLLGATE_SERVER__{}) \
         [default: {default}]",
        setting.to_uppercase()
    )
}

/// `tollgate settle`: what a settler alone uses (no gRPC listener, no dev mode, no
/// restore: those are `serve`'s).
#[derive(Debug, Args)]
pub struct SettleArgs {
    /// Config file (TOML); default ./tollgate.toml when it exists.
    #[arg(long)]
    pub config: Option<PathBuf>,
    #[arg(long)]
    pub redis_url: Option<String>,
    #[arg(long, value_name = "ADDR", help = listen_help("HTTP (/healthz, /readyz, /metrics)", "http_addr", DEFAULT_HTTP_ADDR))]
    pub http_addr: Option<String>,
    /// Durable store: postgres://… or sqlite://PATH (default sqlite://tollgate.db).
    #[arg(long)]
    pub store: Option<String>,
}

#[derive(Debug, Args)]
pub struct AdminArgs {
    /// gRPC address of the server: http://HOST:PORT; a bare HOST:PORT (as `serve`
    /// prints its gRPC address) means http://HOST:PORT. No TLS (https:// is refused).
    #[arg(long, default_value_t = format!("http://{DEFAULT_GRPC_ADDR}"), env = "TOLLGATE_SERVER")]
    pub server: String,
    /// Admin token (default: the token `serve --dev` prints).
    #[arg(long, env = "TOLLGATE_ADMIN_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    #[command(subcommand)]
    pub command: AdminCommand,
}

#[derive(Debug, Subcommand)]
pub enum AdminCommand {
    /// Grant credits: adds a lot to a wallet.
    Grant {
        account: String,
        // A negative number is an amount (refused by the server, by name), not a flag.
        #[arg(allow_negative_numbers = true)]
        amount: i64,
        #[arg(long, default_value = "default")]
        wallet: String,
        /// purchase | demo | promo | adjustment
        #[arg(long, default_value = "purchase")]
        kind: String,
        /// 0..=100, lower burns first.
        #[arg(long, allow_negative_numbers = true)]
        priority: Option<i32>,
        /// Expiry: a UTC time (`2026-12-31T23:59:59Z`) or ms since the epoch (default:
        /// never).
        #[arg(long, default_value_t = 0, allow_negative_numbers = true, value_parser = expiry)]
        expires_at: i64,
        #[arg(long, default_value = "")]
        description: String,
        /// Makes the command safe to re-run (e.g. after a timeout): the same key with the
        /// same arguments answers the first grant again, marked replayed, and grants
        /// nothing (for ledger.idempotency_window_secs, default 24 h). Default: a fresh
        /// key, so a repeated command grants again.
        #[arg(long, value_parser = non_empty)]
        idempotency_key: Option<String>,
    },
    /// Show an account's balances (or an org's, as one member sees them).
    Balance {
        account: String,
        #[arg(long, default_value = "")]
        wallet: String,
        /// The org member whose view to show (account is then the org).
        #[arg(long, default_value = "")]
        member: String,
    },
    /// Make an API key for an account (printed once; tollgate keeps only its hash).
    CreateKey {
        /// The account; for an org workspace key, the org (or use --org).
        account: String,
        #[arg(long, default_value = "")]
        name: String,
        /// Make an org workspace key, bound to this org for life.
        #[arg(long, default_value = "")]
        org: String,
        /// The member the org key acts for (their allocation and budget apply).
        #[arg(long, default_value = "")]
        member: String,
        /// The owner or admin making an org key.
        #[arg(long, default_value = "")]
        actor: String,
        /// A retry with the same key answers the key the first call made (its secret is
        /// shown only once, by the first call). Default: none, so a repeated command makes
        /// another key.
        #[arg(long, value_parser = non_empty)]
        idempotency_key: Option<String>,
    },
    /// Organizations: members, allocations, budgets.
    #[command(subcommand)]
    Org(OrgCommand),
    /// Revoke an API key by its id (other sidecars stop accepting it within
    /// gateway.identity_cache_ttl_ms).
    RevokeKey { key_id: String },
    /// List an account's API keys (ids and names, never secrets).
    Keys { account: String },
    /// Show a wallet's live lots in burn order.
    Lots {
        account: String,
        #[arg(long, default_value = "default")]
        wallet: String,
    },
    /// Correct a balance: a positive amount adds a lot of kind adjustment, a negative one
    /// takes credits in burn order (refused if more than available).
    Adjust {
        account: String,
        /// Signed, non-zero (e.g. -50).
        #[arg(allow_negative_numbers = true)]
        amount: i64,
        #[arg(long, default_value = "default")]
        wallet: String,
        /// A positive adjustment's lot: 0..=100, lower burns first.
        #[arg(long, allow_negative_numbers = true)]
        priority: Option<i32>,
        /// A positive adjustment's lot: expiry, a UTC time (`2026-12-31T23:59:59Z`) or ms
        /// since the epoch (default: never).
        #[arg(long, default_value_t = 0, allow_negative_numbers = true, value_parser = expiry)]
        expires_at: i64,
        /// Why (kept on the ledger event).
        #[arg(long, default_value = "")]
        description: String,
        /// As for grant: the same key with the same arguments answers the first
        /// adjustment again and changes nothing. Default: a fresh key.
        #[arg(long, value_parser = non_empty)]
        idempotency_key: Option<String>,
    },
    /// Refund a charge: returns up to what a debit or capture took (minus earlier refunds)
    /// to a new lot of kind refund.
    Refund {
        /// The charge: the event id of its debit or capture (their `charge_id`).
        charge_id: String,
        #[arg(allow_negative_numbers = true)]
        amount: i64,
        /// As for grant: the same key with the same arguments answers the first refund
        /// again and refunds nothing. Default: a fresh key.
        #[arg(long, value_parser = non_empty)]
        idempotency_key: Option<String>,
    },
}

/// How `admin grant` and `adjust` name the request fields they send, so that a refusal
/// (the server's `google.rpc.BadRequest`) names what the operator typed: `--expires-at`,
/// not `expires_at_ms`. Positionals as clap names them.
pub const GRANT_FIELDS: &[(&str, &str)] = &[
    ("account_id", "<ACCOUNT>"),
    ("amount", "<AMOUNT>"),
    ("wallet", "--wallet"),
    ("kind", "--kind"),
    ("priority", "--priority"),
    ("expires_at_ms", "--expires-at"),
    ("description", "--description"),
    ("idempotency_key", "--idempotency-key"),
];
/// As [`GRANT_FIELDS`], for `admin refund`.
pub const REFUND_FIELDS: &[(&str, &str)] = &[
    ("charge_id", "<CHARGE_ID>"),
    ("amount", "<AMOUNT>"),
    ("idempotency_key", "--idempotency-key"),
];

/// As [`GRANT_FIELDS`], for `admin org create`, `add-member`, `remove-member` and
/// `allocate` (whose amount is the request's `amount`, or its `delta` with --add).
pub const ORG_FIELDS: &[(&str, &str)] = &[
    ("org_id", "<ORG>"),
    ("owner_id", "<OWNER>"),
    ("member_id", "<MEMBER>"),
    ("actor_id", "--actor"),
    ("role", "--role"),
    ("wallet", "--wallet"),
    ("amount", "<AMOUNT>"),
    ("delta", "<AMOUNT>"),
    ("idempotency_key", "--idempotency-key"),
];
/// As [`GRANT_FIELDS`], for `admin balance`.
pub const BALANCE_FIELDS: &[(&str, &str)] = &[
    ("account_id", "<ACCOUNT>"),
    ("wallet", "--wallet"),
    ("member_id", "--member"),
];
/// As [`GRANT_FIELDS`], for `admin create-key`.
pub const CREATE_KEY_FIELDS: &[(&str, &str)] = &[
    ("account_id", "<ACCOUNT>"),
    ("name", "--name"),
    ("org_id", "--org"),
    ("member_id", "--member"),
    ("actor_id", "--actor"),
    ("idempotency_key", "--idempotency-key"),
];
/// As [`GRANT_FIELDS`], for `admin lots`.
pub const LOTS_FIELDS: &[(&str, &str)] = &[("account_id", "<ACCOUNT>"), ("wallet", "--wallet")];
/// As [`GRANT_FIELDS`], for `admin keys`.
pub const KEYS_FIELDS: &[(&str, &str)] = &[("account_id", "<ACCOUNT>")];
/// As [`GRANT_FIELDS`], for `admin revoke-key`.
pub const REVOKE_KEY_FIELDS: &[(&str, &str)] = &[("key_id", "<KEY_ID>")];
/// As [`GRANT_FIELDS`], for `admin org budget`.
pub const BUDGET_FIELDS: &[(&str, &str)] = &[
    ("account_id", "<ACCOUNT>"),
    ("member_id", "--member"),
    ("wallet", "--wallet"),
    ("limit", "<LIMIT>"),
    ("period", "--period"),
    ("window_secs", "--window-secs"),
    ("utc_offset_minutes", "--utc-offset-minutes"),
    ("idempotency_key", "--idempotency-key"),
];

#[derive(Debug, Subcommand)]
pub enum OrgCommand {
    /// Make an account an organization, with its first owner.
    Create {
        org: String,
        owner: String,
        /// As for grant: the same key with the same arguments answers the first create
        /// again (instead of refusing: the organization exists). Default: a fresh key.
        #[arg(long, value_parser = non_empty)]
        idempotency_key: Option<String>,
    },
    /// Add a member or change a member's role (owner | admin | member).
    AddMember {
        org: String,
        member: String,
        #[arg(long, default_value = "member")]
        role: String,
        /// The owner or admin making the change.
        #[arg(long)]
        actor: String,
        /// As for grant: the same key with the same arguments answers the first change
        /// again and changes nothing (a role changed since is not changed back). Default:
        /// a fresh key.
        #[arg(long, value_parser = non_empty)]
        idempotency_key: Option<String>,
    },
    /// Remove a member.
    RemoveMember {
        org: String,
        member: String,
        #[arg(long)]
        actor: String,
        /// As for grant: the same key with the same arguments answers the first removal
        /// again (instead of refusing: no longer a member). Default: a fresh key.
        #[arg(long, value_parser = non_empty)]
        idempotency_key: Option<String>,
    },
    /// List members and roles.
    Members { org: String },
    /// Set a member's allocation of an org wallet (or change it with --add).
    Allocate {
        org: String,
        member: String,
        /// With --add, a signed change (e.g. -50).
        #[arg(allow_hyphen_values = true)]
        amount: i64,
        #[arg(long, default_value = "default")]
        wallet: String,
        /// Treat amount as a signed change of the current allocation.
        #[arg(long)]
        add: bool,
        #[arg(long)]
        actor: String,
        /// As for grant: the same key with the same arguments answers the first allocation
        /// again and changes nothing. Default: a fresh key, so a repeated --add adds again.
        #[arg(long, value_parser = non_empty)]
        idempotency_key: Option<String>,
    },
    /// Set a budget (0 removes it): of an account's wallet, or with --member of an org
    /// member's spend from an org wallet.
    Budget {
        account: String,
        #[arg(allow_negative_numbers = true)]
        limit: i64,
        /// day | month | window
        #[arg(long, default_value = "day")]
        period: String,
        #[arg(long, default_value_t = 0)]
        window_secs: i64,
        #[arg(long, default_value = "")]
        member: String,
        #[arg(long, default_value = "default")]
        wallet: String,
        /// Calendar periods start at midnight of this UTC offset.
        #[arg(long, default_value_t = 0, allow_hyphen_values = true)]
        utc_offset_minutes: i32,
        /// As for grant: the same key with the same arguments answers the first call again
        /// and changes nothing. Default: a fresh key.
        #[arg(long, value_parser = non_empty)]
        idempotency_key: Option<String>,
    },
}

/// A time in ms since the epoch as a person reads it: `2026-12-07T00:00:00Z` (UTC; the ms
/// shown only when not whole seconds). Outside years 0..=9999, the ms as they are.
pub fn utc_time(ms: i64) -> String {
    const DAY_MS: i64 = 86_400_000;
    let (days, ms_of_day) = (ms.div_euclid(DAY_MS), ms.rem_euclid(DAY_MS));
    // Days since 1970-01-01 to a civil date (H. Hinnant's days_from_civil, inverted).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    if !(0..=9999).contains(&year) {
        return format!("{ms} ms");
    }
    let (h, m, s, milli) = (
        ms_of_day / 3_600_000,
        ms_of_day / 60_000 % 60,
        ms_of_day / 1_000 % 60,
        ms_of_day % 1_000,
    );
    let fraction = if milli == 0 {
        String::new()
    } else {
        format!(".{milli:03}")
    };
    format!("{year:04}-{month:02}-{day:02}T{h:02}:{m:02}:{s:02}{fraction}Z")
}

/// `--expires-at`: ms since the epoch as they are (the server judges the range, naming
/// the flag), or a UTC time as [`utc_time`] prints it, `2026-12-31T23:59:59Z` (ms
/// optional: `.250`), so an operator need not compute ms by hand.
fn expiry(text: &str) -> Result<i64, String> {
    if let Ok(ms) = text.parse::<i64>() {
        return Ok(ms);
    }
    utc_ms(text).ok_or_else(|| {
        "expected a UTC time such as 2026-12-31T23:59:59Z, or ms since the epoch".to_owned()
    })
}

/// `YYYY-MM-DDTHH:MM:SS[.mmm]Z` to ms since the epoch; None for anything else (another
/// offset, a date that does not exist).
fn utc_ms(text: &str) -> Option<i64> {
    let text = text.strip_suffix('Z').or_else(|| text.strip_suffix('z'))?;
    let (seconds, milli) = match text.split_once('.') {
        Some((seconds, milli)) if milli.len() == 3 => (seconds, milli),
        Some(_) => return None,
        None => (text, "000"),
    };
    let bytes = seconds.as_bytes();
    if bytes.len() != 19
        || [bytes[4], bytes[7], bytes[13], bytes[16]] != [b'-', b'-', b':', b':']
        || !matches!(bytes[10], b'T' | b't')
    {
        return None;
    }
    let digits = |text: &str| -> Option<i64> {
        if text.bytes().all(|b| b.is_ascii_digit()) {
            text.parse().ok()
        } else {
            None
        }
    };
    let number = |range: std::ops::Range<usize>| digits(seconds.get(range)?);
    let (year, month, day) = (number(0..4)?, number(5..7)?, number(8..10)?);
    let (hour, minute, second) = (number(11..13)?, number(14..16)?, number(17..19)?);
    let milli = digits(milli)?;
    if !(1..=12).contains(&month) || hour > 23 || minute > 59 || second > 59 {
        return None;
    }
    let leap = year % 4 == 0 && (year % 100 != 0 || year % 400 == 0);
    let month_days = match month {
        2 if leap => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    };
    if !(1..=month_days).contains(&day) {
        return None;
    }
    // H. Hinnant's days_from_civil (utc_time's inverse).
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(((days * 24 + hour) * 60 + minute) * 60_000 + second * 1_000 + milli)
}

#[cfg(test)]
mod tests {
    use super::{expiry, utc_ms, utc_time};

    #[test]
    fn expiry_takes_ms_or_the_utc_times_utc_time_prints() {
        assert_eq!(expiry("0"), Ok(0));
        assert_eq!(
            expiry("-5"),
            Ok(-5),
            "the server refuses it, naming the flag"
        );
        assert_eq!(expiry("1798761599000"), Ok(1_798_761_599_000));
        assert_eq!(expiry("2026-12-31T23:59:59Z"), Ok(1_798_761_599_000));
        for ms in [
            0,
            951_782_400_000,
            1_796_601_600_123,
            4_107_542_400_000,
            253_402_300_799_999,
        ] {
            assert_eq!(utc_ms(&utc_time(ms)), Some(ms), "{}", utc_time(ms));
        }
        for bad in [
            "",
            "tomorrow",
            "2026-12-31",
            "2026-12-31T23:59:59",
            "2026-12-31T23:59:59+01:00",
            "2026-12-31 23:59:59Z",
            "2026-02-29T00:00:00Z",
            "2026-13-01T00:00:00Z",
            "2026-12-31T24:00:00Z",
            "2026-12-31T23:59:59.5Z",
            "+026-12-31T23:59:59Z",
        ] {
            assert!(expiry(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn times_are_shown_as_utc_dates() {
        for (ms, shown) in [
            (0, "1970-01-01T00:00:00Z"),
            (-1, "1969-12-31T23:59:59.999Z"),
            (951_782_400_000, "2000-02-29T00:00:00Z"),
            (1_800_000_000_000, "2027-01-15T08:00:00Z"),
            (1_796_601_600_123, "2026-12-07T00:00:00.123Z"),
            (4_107_542_400_000, "2100-03-01T00:00:00Z"),
            (253_402_300_799_999, "9999-12-31T23:59:59.999Z"),
        ] {
            assert_eq!(utc_time(ms), shown, "{ms}");
        }
        assert_eq!(utc_time(253_402_300_800_000), "253402300800000 ms");
        assert_eq!(utc_time(i64::MIN), format!("{} ms", i64::MIN));
    }

    /// A drain timeout past a day (or 0) is refused at parsing: `u64::MAX` ("wait
    /// forever") overflowed an Instant and panicked; 0 always failed.
    #[test]
    fn drain_timeouts_are_bounded() {
        use clap::Parser;
        let parse = |secs: &str| {
            super::Cli::try_parse_from(["tollgate", "reconcile", "--drain-timeout-secs", secs])
                .map(|_| ())
        };
        assert!(parse("600").is_ok());
        assert!(parse("0").is_err());
        assert!(parse("18446744073709551615").is_err());
    }
}
