//! tollgate: a credit-metering sidecar for API gateways.
//!
//! Module map (docs/ARCHITECTURE.md has the picture):
//!
//! - [`ledger`] — the money. Balances, lots, holds, idempotency records and the outbox
//!   live in Redis and change only through one atomic Lua script per operation
//!   (`ledger/lua/*.lua`); the typed API over them, validation, and the sweeper.
//! - [`api`] — tollgate.v1 gRPC services (`Metering`, `Admin`), token checks, and the one
//!   place that maps ledger errors to gRPC statuses.
//! - [`gateway`] — the front door for API gateways: Envoy ext_authz, HTTP forward-auth,
//!   Envoy's access-log settlement of holds, the price book, API keys and the identity
//!   cache. One check = identity (cached) + price (in memory) + one ledger script.
//! - [`config`] — the typed configuration (file, `TOLLGATE_` environment, flags),
//!   validated once with every bad setting reported.
//! - [`server`] — `tollgate serve` wiring: listeners, health endpoints, graceful drain.
//! - [`transport`] — how the ports take connections: the gRPC server's stream cap,
//!   keepalives, message sizes and unary deadline; the HTTP/1.1 server loop with its
//!   header timeout, buffer bound and connection cap.
//! - [`settle`] — the settler (outbox → durable store, exactly once), the PostgreSQL /
//!   SQLite store, reconcile.
//! - [`webhooks`] — usage webhooks derived from settled events: rules, signatures,
//!   delivery with retries, in order per account.
//! - [`telemetry`] — logs, metric names and the Prometheus recorder, the failed-request
//!   log layer.
//! - [`cli`], [`dev`] — the command line and `serve --dev`'s private redis-server.
//! - [`bench`] — `tollgate bench`: the load generator and its raw-Redis baseline.

pub mod api;
pub mod bench;
pub mod cli;
pub mod config;
pub mod dev;
pub mod gateway;
pub mod ledger;
pub mod server;
pub mod settle;
pub mod telemetry;
pub mod transport;
pub mod webhooks;
