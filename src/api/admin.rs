//! tollgate.v1.Admin handlers.

use std::sync::Arc;
use std::time::Duration;

use tonic::{Request, Response, Status};

use super::pb::{self, admin_server::Admin};
use super::status::{store_to_status, to_status};
use crate::gateway::identity::{KeyBinding, KeyStore};
use crate::ledger::command::{wallet_or_default, Violations, CREDITS_MAX};
use crate::ledger::org::{
    AllocationChange, BudgetPeriod, OrgEvent, SetBudget, MEMBERS_PAGE_DEFAULT, MEMBERS_PAGE_MAX,
};
use crate::ledger::{AdjustInput, GrantInput, Ledger, LedgerError};
use crate::settle::store::ApiKeyRecord;
use crate::settle::webhook_store::{
    Delivery, DeliveryCursor, DeliveryQuery, DELIVERIES_PAGE_MAX, STATUS_DELIVERED, STATUS_FAILED,
    STATUS_PENDING,
};
use crate::settle::Store;
use crate::webhooks::{Rules, Threshold, WebhookType};

/// Background attempts at saving a key the store refused (about ten minutes with the
/// capped backoff).
const KEY_SAVE_RETRIES: u32 = 25;
/// How long CreateApiKey waits for the store to keep a new key before answering anyway
/// (the save goes on in the background): far under any caller's deadline, so that a
/// store that hangs does not cost the caller the key's secret.
pub const KEY_SAVE_WAIT: Duration = Duration::from_secs(2);

/// Deliveries per page unless asked otherwise.
pub const DELIVERIES_PAGE_DEFAULT: u32 = 100;

pub struct AdminService {
    ledger: Arc<Ledger>,
    keys: Arc<KeyStore>,
    store: Option<Arc<Store>>,
    webhooks: Option<Arc<Rules>>,
}

impl AdminService {
    pub fn new(ledger: Arc<Ledger>, keys: Arc<KeyStore>) -> Self {
        Self {
            ledger,
            keys,
            store: None,
            webhooks: None,
        }
    }

    /// Keeps an API key (a hash only) in the durable ledger, so `tollgate restore` can
    /// rebuild it after Redis lost its data.
    async fn save_key(&self, key: ApiKeyRecord) -> Result<(), Status> {
        // (CreateApiKey answers anyway and saves in the background: `save_new_key`.)
        let revoked = key.revoked_at_ms > 0;
        self.store()?.save_api_key(&key).await.map_err(|err| {
            tracing::warn!(error = %err, "api key not saved in the durable ledger");
            Status::unavailable(if revoked {
                // Revoked in Redis already; until the ledger has it too, a restore after
                // a Redis loss would bring the key back.
                "the key is revoked in Redis but not yet in the durable ledger: retry the call"
            } else {
                "the key is live in Redis but not yet in the durable ledger: retry the call"
            })
        })
    }

    /// The keys a member's removal or demotion revoked (`lua/org.lua`, in the same call:
    /// every key the member made, and on a removal every key bound to them): cached as
    /// revoked in this process's identity cache at once and saved in the durable ledger, as
    /// RevokeApiKey does with one key, so a restore after a Redis loss does not bring them
    /// back. A save the store refuses is UNAVAILABLE: the change is made in Redis, and a
    /// retry with the same idempotency key replays it, keys included, and saves them
    /// again. Answers their ids. (Should no retry come, `tollgate restore` still revokes a
    /// live key whose maker no longer manages the org, or whose member left it.)
    async fn save_revoked_org_keys(
        &self,
        org_id: &str,
        event: &OrgEvent,
    ) -> Result<Vec<String>, Status> {
        if event.revoked_keys.is_empty() {
            return Ok(Vec::new());
        }
        self.keys
            .forget_revoked(event.revoked_keys.iter().map(|k| k.digest_hex.as_str()));
        let store = match self.store() {
            Ok(store) => store,
            // No durable ledger to keep them in (nothing to restore from either).
            Err(_) => {
                return Ok(event
                    .revoked_keys
                    .iter()
                    .map(|k| k.key_id.clone())
                    .collect())
            }
        };
        for key in &event.revoked_keys {
            let record = ApiKeyRecord {
                key_id: key.key_id.clone(),
                account_id: org_id.to_owned(),
                member_id: String::new(),
                digest: key.digest_hex.clone(),
                // The key's own record (saved when it was made) has these; the member
                // the key is bound to and its maker too (either may be the member who
                // left: the answer does not say which).
                name: String::new(),
                created_at_ms: 0,
                revoked_at_ms: key.revoked_at_ms,
                created_by: String::new(),
            };
            store.save_api_key(&record).await.map_err(|err| {
                tracing::warn!(error = %err, "revoked org key not saved in the durable ledger");
                Status::unavailable(
                    "the change is made and the member's keys are revoked in Redis, but not \
                     yet in the durable ledger: retry the call with the same idempotency key",
                )
            })?;
        }
        Ok(event
            .revoked_keys
            .iter()
            .map(|k| k.key_id.clone())
            .collect())
    }

    /// Saves a key CreateApiKey made (or replayed) in the durable ledger, waiting at most
    /// [`KEY_SAVE_WAIT`]: the key is live in Redis and its secret is in the answer only (a
    /// retry replays without it), so the answer must not wait on a store that hangs. The
    /// save runs in a task of its own, which a caller's deadline cannot cut short, and
    /// which retries a refused save, with capped backoff, for about ten minutes; until it
    /// lands, a restore after a Redis loss would not bring the key back. Without a store
    /// there is nothing to save.
    async fn save_new_key(&self, key: ApiKeyRecord) {
        let Some(store) = self.store.clone() else {
            return;
        };
        let (first, first_answer) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            let mut saved = store.save_api_key(&key).await;
            let _ = first.send(saved.is_ok());
            let mut wait = Duration::from_millis(500);
            for _ in 0..KEY_SAVE_RETRIES {
                match saved {
                    Ok(()) => return,
                    Err(err) => {
                        tracing::warn!(error = %err, "api key not saved in the durable ledger yet: retrying");
                    }
                }
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(30));
                saved = store.save_api_key(&key).await;
                if saved.is_ok() {
                    tracing::info!("api key saved in the durable ledger on a retry");
                }
            }
            if let Err(err) = saved {
                tracing::error!(
                    error = %err,
                    "api key never saved in the durable ledger: a restore after a Redis loss \
                     would not bring it back (revoke it and make another)"
                );
            }
        });
        if tokio::time::timeout(KEY_SAVE_WAIT, first_answer)
            .await
            .is_err()
        {
            tracing::warn!(
                wait_ms = KEY_SAVE_WAIT.as_millis() as u64,
                "the durable ledger did not take a new api key in time: answering with it, \
                 and saving it in the background"
            );
        }
    }

    /// Serves the webhook RPCs from this store, with the configured webhook rules (None
    /// when webhooks are off).
    pub fn with_store(mut self, store: Arc<Store>, webhooks: Option<Arc<Rules>>) -> Self {
        self.store = Some(store);
        self.webhooks = webhooks;
        self
    }

    async fn allocation(
        &self,
        org_id: String,
        actor_id: String,
        member_id: String,
        wallet: String,
        change: AllocationChange,
        idempotency_key: String,
    ) -> Result<Response<pb::Allocation>, Status> {
        let wallet = wallet_or_default(wallet);
        let out = self
            .ledger
            .allocate(
                &org_id,
                &actor_id,
                &member_id,
                &wallet,
                change,
                &idempotency_key,
            )
            .await
            .map_err(to_status)?;
        Ok(Response::new(pb::Allocation {
            org_id,
            member_id,
            wallet,
            allocated: out.allocated,
            used: out.used,
            remaining: (out.allocated - out.used).max(0),
            event_id: out.event_id,
            replayed: out.replayed,
        }))
    }

    fn store(&self) -> Result<&Store, Status> {
        self.store
            .as_deref()
            .ok_or_else(|| Status::failed_precondition("no durable store configured"))
    }

    async fn threshold(
        &self,
        account_id: String,
        wallet: String,
    ) -> Result<pb::BalanceThreshold, Status> {
        let own = self
            .store()?
            .threshold_override(&account_id, &wallet)
            .await
            .map_err(store_to_status)?;
        let effective = match &self.webhooks {
            Some(rules) => rules.threshold(&wallet, own),
            None => own.unwrap_or_default(),
        };
        Ok(pb::BalanceThreshold {
            account_id,
            wallet,
            low_balance: effective.low_balance,
            low_balance_percent: effective.low_balance_percent as i32,
            account_specific: own.is_some(),
        })
    }
}

fn delivery(d: Delivery) -> pb::WebhookDelivery {
    pb::WebhookDelivery {
        delivery_id: d.delivery_id,
        event_type: d.event_type,
        account_id: d.account_id,
        wallet: d.wallet,
        status: d.status,
        attempts: d.attempts,
        created_at_ms: d.created_at_ms,
        next_attempt_at_ms: d.next_attempt_at_ms,
        delivered_at_ms: d.delivered_at_ms,
        last_error: d.last_error,
        last_status_code: i32::try_from(d.last_status_code).unwrap_or(0),
        payload: d.payload,
    }
}

/// What a deliveries page token is bound to: the filters of the listing it continues
/// (not the page size), so a token passed with other filters is refused, not read as a
/// place in a listing it was never in.
pub fn delivery_binding(account_id: &str, status: &str, event_type: &str) -> String {
    crate::ledger::command::digest(&["deliveries", account_id, status, event_type])
}

/// Delivery page tokens: hex of "<ms>/<seq>/<ordinal>/<delivery id>/<binding>" (opaque to
/// clients; [`delivery_binding`]).
pub fn delivery_token(c: &DeliveryCursor, binding: &str) -> String {
    hex::encode(format!(
        "{}/{}/{}/{}/{binding}",
        c.position.0, c.position.1, c.position.2, c.delivery_id
    ))
}

/// A deliveries page token's place and binding (`None`: a token of a tollgate from before
/// bindings, still taken during a rolling upgrade).
pub fn parse_delivery_token(token: &str) -> Option<(DeliveryCursor, Option<String>)> {
    if token.len() > 256 {
        return None;
    }
    let text = String::from_utf8(hex::decode(token).ok()?).ok()?;
    let mut parts = text.splitn(5, '/');
    let mut int = || parts.next()?.parse::<i64>().ok();
    let position = (int()?, int()?, int()?);
    let delivery_id = parts.next()?;
    if !crate::webhooks::rules::is_delivery_id(delivery_id) {
        return None;
    }
    let binding = super::metering::token_binding(parts.next())?;
    let cursor = DeliveryCursor {
        position,
        delivery_id: delivery_id.to_owned(),
    };
    Some((cursor, binding))
}

/// What a members page token is bound to: the org of the listing it continues, so a
/// token passed with another org is refused, not read as a place in a listing it was
/// never in.
fn members_binding(org_id: &str) -> String {
    crate::ledger::command::digest(&["members", org_id])
}

/// Members page tokens, opaque to clients: "m" and the hex of "<member id>/<binding>"
/// (the page starts after that member; member ids hold no '/').
pub fn members_token(org_id: &str, after: &str) -> String {
    format!(
        "m{}",
        hex::encode(format!("{after}/{}", members_binding(org_id)))
    )
}

/// Why a members page token is refused (`page_token`'s description): another org's.
pub const MEMBERS_FOREIGN_TOKEN: &str = "was returned for another org_id";

/// The member id a page starts after, from a token [`members_token`] wrote for this org
/// (empty token: the first page); else what is wrong with the token.
pub fn parse_members_token(token: &str, org_id: &str) -> Result<String, &'static str> {
    use super::metering::UNKNOWN_TOKEN;
    if token.is_empty() {
        return Ok(String::new());
    }
    let parse = || -> Option<(String, String)> {
        let text = token.strip_prefix('m').filter(|t| t.len() <= 512)?;
        let text = String::from_utf8(hex::decode(text).ok()?).ok()?;
        let (after, binding) = text.split_once('/')?;
        let mut v = Violations::default();
        v.account_id("page_token", after);
        v.finish().ok()?;
        Some((
            after.to_owned(),
            super::metering::token_binding(Some(binding))??,
        ))
    };
    let (after, binding) = parse().ok_or(UNKNOWN_TOKEN)?;
    if binding != members_binding(org_id) {
        return Err(MEMBERS_FOREIGN_TOKEN);
    }
    Ok(after)
}

fn invalid(violations: Violations) -> Result<(), Status> {
    violations
        .finish()
        .map_err(|v| to_status(LedgerError::InvalidArgument(v)))
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn grant(
        &self,
        request: Request<pb::GrantRequest>,
    ) -> Result<Response<pb::GrantResponse>, Status> {
        let r = request.into_inner();
        let cmd = GrantInput {
            account_id: r.account_id,
            wallet: r.wallet,
            amount: r.amount,
            kind: r.kind,
            priority: r.priority,
            expires_at_ms: r.expires_at_ms,
            description: r.description,
            idempotency_key: r.idempotency_key,
            metadata: super::metadata(r.metadata),
        }
        .into_command()
        .map_err(|v| to_status(LedgerError::InvalidArgument(v)))?;
        let out = self.ledger.grant(&cmd).await.map_err(to_status)?;
        Ok(Response::new(pb::GrantResponse {
            event_id: out.event_id,
            lot_id: out.lot_id,
            available: out.available,
            replayed: out.replayed,
        }))
    }

    async fn adjust(
        &self,
        request: Request<pb::AdjustRequest>,
    ) -> Result<Response<pb::AdjustResponse>, Status> {
        let r = request.into_inner();
        let cmd = AdjustInput {
            account_id: r.account_id,
            wallet: r.wallet,
            amount: r.amount,
            priority: r.priority,
            expires_at_ms: r.expires_at_ms,
            description: r.description,
            idempotency_key: r.idempotency_key,
            metadata: super::metadata(r.metadata),
        }
        .into_command()
        .map_err(|v| to_status(LedgerError::InvalidArgument(v)))?;
        let out = self.ledger.adjust(&cmd).await.map_err(to_status)?;
        Ok(Response::new(pb::AdjustResponse {
            event_id: out.event_id,
            lot_id: out.lot_id,
            available: out.available,
            replayed: out.replayed,
        }))
    }

    async fn create_api_key(
        &self,
        request: Request<pb::CreateApiKeyRequest>,
    ) -> Result<Response<pb::CreateApiKeyResponse>, Status> {
        let r = request.into_inner();
        let binding = KeyBinding {
            org_id: r.org_id,
            member_id: r.member_id,
            actor_id: r.actor_id,
        };
        let out = self
            .keys
            .create(&r.account_id, &r.name, &binding, &r.idempotency_key)
            .await
            .map_err(to_status)?;
        // An org workspace key belongs to the org. (A replay saves the key again: the first
        // call may have failed after making it, before the store had it.)
        let account_id = if binding.org_id.is_empty() {
            r.account_id
        } else {
            binding.org_id
        };
        let record = ApiKeyRecord {
            key_id: out.key_id.clone(),
            account_id: account_id.clone(),
            digest: out.digest_hex.clone(),
            name: r.name.clone(),
            created_at_ms: out.created_at_ms,
            revoked_at_ms: 0,
            member_id: binding.member_id.clone(),
            created_by: binding.actor_id.clone(),
        };
        // The key is live in Redis and its secret is in this answer only (a retry replays
        // without it): answer, the save going on in the background if need be.
        self.save_new_key(record).await;
        Ok(Response::new(pb::CreateApiKeyResponse {
            key_id: out.key_id,
            api_key: out.api_key,
            account_id,
            name: r.name,
            created_at_ms: out.created_at_ms,
            member_id: binding.member_id,
            replayed: out.replayed,
        }))
    }

    async fn revoke_api_key(
        &self,
        request: Request<pb::RevokeApiKeyRequest>,
    ) -> Result<Response<pb::RevokeApiKeyResponse>, Status> {
        let r = request.into_inner();
        let out = self.keys.revoke(&r.key_id).await.map_err(to_status)?;
        self.save_key(ApiKeyRecord {
            key_id: out.key_id.clone(),
            account_id: out.account_id.clone(),
            digest: String::new(),
            name: String::new(),
            created_at_ms: 0,
            revoked_at_ms: out.revoked_at_ms,
            member_id: String::new(),
            created_by: String::new(),
        })
        .await?;
        Ok(Response::new(pb::RevokeApiKeyResponse {
            key_id: out.key_id,
            account_id: out.account_id,
            revoked_at_ms: out.revoked_at_ms,
            already_revoked: out.already_revoked,
        }))
    }

    async fn list_api_keys(
        &self,
        request: Request<pb::ListApiKeysRequest>,
    ) -> Result<Response<pb::ListApiKeysResponse>, Status> {
        let r = request.into_inner();
        let keys = self.keys.list(&r.account_id).await.map_err(to_status)?;
        Ok(Response::new(pb::ListApiKeysResponse {
            keys: keys
                .into_iter()
                .map(|k| pb::ApiKey {
                    key_id: k.key_id,
                    name: k.name,
                    created_at_ms: k.created_at_ms,
                    revoked_at_ms: k.revoked_at_ms,
                    member_id: k.member_id,
                    created_by: k.created_by,
                })
                .collect(),
        }))
    }

    async fn list_webhook_deliveries(
        &self,
        request: Request<pb::ListWebhookDeliveriesRequest>,
    ) -> Result<Response<pb::ListWebhookDeliveriesResponse>, Status> {
        let r = request.into_inner();
        let mut v = Violations::default();
        if !r.account_id.is_empty() {
            v.account_id("account_id", &r.account_id);
        }
        if ![STATUS_PENDING, STATUS_DELIVERED, STATUS_FAILED, ""].contains(&r.status.as_str()) {
            v.add("status", "must be pending, delivered or failed");
        }
        if !r.event_type.is_empty() && WebhookType::parse(&r.event_type).is_none() {
            v.add("event_type", "is not a webhook event type");
        }
        if !(0..=DELIVERIES_PAGE_MAX as i32).contains(&r.page_size) {
            v.add("page_size", format!("must be in 0..={DELIVERIES_PAGE_MAX}"));
        }
        let binding = delivery_binding(&r.account_id, &r.status, &r.event_type);
        let after = if r.page_token.is_empty() {
            None
        } else {
            match parse_delivery_token(&r.page_token) {
                Some((_, Some(bound))) if bound != binding => {
                    v.add(
                        "page_token",
                        "was returned for another query (account_id, status and event_type \
                         must be those of the first page)",
                    );
                    None
                }
                Some((after, _)) => Some(after),
                None => {
                    v.add("page_token", super::metering::UNKNOWN_TOKEN);
                    None
                }
            }
        };
        invalid(v)?;
        let query = DeliveryQuery {
            account_id: (!r.account_id.is_empty()).then_some(r.account_id),
            status: (!r.status.is_empty()).then_some(r.status),
            event_type: (!r.event_type.is_empty()).then_some(r.event_type),
            page_size: if r.page_size == 0 {
                DELIVERIES_PAGE_DEFAULT
            } else {
                r.page_size as u32
            },
            after,
        };
        let page = self
            .store()?
            .list_deliveries(&query)
            .await
            .map_err(store_to_status)?;
        Ok(Response::new(pb::ListWebhookDeliveriesResponse {
            next_page_token: page
                .next
                .as_ref()
                .map(|c| delivery_token(c, &binding))
                .unwrap_or_default(),
            deliveries: page.deliveries.into_iter().map(delivery).collect(),
        }))
    }

    async fn retry_webhook_delivery(
        &self,
        request: Request<pb::RetryWebhookDeliveryRequest>,
    ) -> Result<Response<pb::WebhookDelivery>, Status> {
        let r = request.into_inner();
        let mut v = Violations::default();
        if !crate::webhooks::rules::is_delivery_id(&r.delivery_id) {
            v.add(
                "delivery_id",
                "must be a delivery id (dlv_ and 24 hex digits)",
            );
        }
        invalid(v)?;
        let store = self.store()?;
        let now = crate::ledger::wall_clock_ms();
        // The delivery as the retry left it: read back afterwards, a dispatcher's attempt
        // could come in between.
        if let Some(retried) = store
            .retry_delivery(&r.delivery_id, now)
            .await
            .map_err(store_to_status)?
        {
            return Ok(Response::new(delivery(retried)));
        }
        match store
            .delivery(&r.delivery_id)
            .await
            .map_err(store_to_status)?
        {
            None => Err(Status::not_found("webhook delivery not found")),
            Some(d) if d.status != STATUS_PENDING => Err(Status::failed_precondition(format!(
                "the delivery is {}: only failed deliveries are retried",
                d.status
            ))),
            Some(d) => Ok(Response::new(delivery(d))),
        }
    }

    async fn set_balance_threshold(
        &self,
        request: Request<pb::SetBalanceThresholdRequest>,
    ) -> Result<Response<pb::BalanceThreshold>, Status> {
        let r = request.into_inner();
        let mut v = Violations::default();
        v.account_id("account_id", &r.account_id);
        v.wallet("wallet", &r.wallet);
        if let Some(n) = r.low_balance {
            if !(0..=CREDITS_MAX).contains(&n) {
                v.add("low_balance", format!("must be in 0..={CREDITS_MAX}"));
            }
        }
        if let Some(p) = r.low_balance_percent {
            if !(0..=100).contains(&p) {
                v.add("low_balance_percent", "must be in 0..=100");
            }
        }
        invalid(v)?;
        let wallet = wallet_or_default(r.wallet);
        let threshold =
            (r.low_balance.is_some() || r.low_balance_percent.is_some()).then(|| Threshold {
                low_balance: r.low_balance.unwrap_or(0),
                low_balance_percent: r.low_balance_percent.unwrap_or(0) as u32,
            });
        self.store()?
            .set_threshold(&r.account_id, &wallet, threshold)
            .await
            .map_err(store_to_status)?;
        Ok(Response::new(self.threshold(r.account_id, wallet).await?))
    }

    async fn get_balance_threshold(
        &self,
        request: Request<pb::GetBalanceThresholdRequest>,
    ) -> Result<Response<pb::BalanceThreshold>, Status> {
        let r = request.into_inner();
        let mut v = Violations::default();
        v.account_id("account_id", &r.account_id);
        v.wallet("wallet", &r.wallet);
        invalid(v)?;
        let wallet = wallet_or_default(r.wallet);
        Ok(Response::new(self.threshold(r.account_id, wallet).await?))
    }

    async fn create_organization(
        &self,
        request: Request<pb::CreateOrganizationRequest>,
    ) -> Result<Response<pb::Organization>, Status> {
        let r = request.into_inner();
        let (event, created_at_ms) = self
            .ledger
            .create_org(&r.org_id, &r.owner_id, &r.idempotency_key)
            .await
            .map_err(to_status)?;
        Ok(Response::new(pb::Organization {
            org_id: r.org_id,
            owner_id: r.owner_id,
            created_at_ms,
            event_id: event.event_id,
            replayed: event.replayed,
        }))
    }

    async fn add_member(
        &self,
        request: Request<pb::AddMemberRequest>,
    ) -> Result<Response<pb::MemberChange>, Status> {
        let r = request.into_inner();
        let event = self
            .ledger
            .add_member(
                &r.org_id,
                &r.actor_id,
                &r.member_id,
                &r.role,
                &r.idempotency_key,
            )
            .await
            .map_err(to_status)?;
        let revoked_key_ids = self.save_revoked_org_keys(&r.org_id, &event).await?;
        Ok(Response::new(pb::MemberChange {
            org_id: r.org_id,
            member_id: r.member_id,
            role: r.role,
            event_id: event.event_id,
            replayed: event.replayed,
            revoked_key_ids,
        }))
    }

    async fn remove_member(
        &self,
        request: Request<pb::RemoveMemberRequest>,
    ) -> Result<Response<pb::MemberChange>, Status> {
        let r = request.into_inner();
        let event = self
            .ledger
            .remove_member(&r.org_id, &r.actor_id, &r.member_id, &r.idempotency_key)
            .await
            .map_err(to_status)?;
        let revoked_key_ids = self.save_revoked_org_keys(&r.org_id, &event).await?;
        Ok(Response::new(pb::MemberChange {
            org_id: r.org_id,
            member_id: r.member_id,
            role: "removed".into(),
            event_id: event.event_id,
            replayed: event.replayed,
            revoked_key_ids,
        }))
    }

    async fn list_members(
        &self,
        request: Request<pb::ListMembersRequest>,
    ) -> Result<Response<pb::ListMembersResponse>, Status> {
        let r = request.into_inner();
        let mut v = Violations::default();
        v.account_id("org_id", &r.org_id);
        let after = parse_members_token(&r.page_token, &r.org_id)
            .map_err(|why| v.add("page_token", why))
            .unwrap_or_default();
        if !(0..=MEMBERS_PAGE_MAX as i32).contains(&r.page_size) {
            v.add("page_size", format!("must be in 0..={MEMBERS_PAGE_MAX}"));
        }
        invalid(v)?;
        let page_size = match r.page_size {
            0 => MEMBERS_PAGE_DEFAULT,
            n => n as u32,
        };
        let page = self
            .ledger
            .members_page(&r.org_id, &after, page_size)
            .await
            .map_err(to_status)?;
        Ok(Response::new(pb::ListMembersResponse {
            next_page_token: page
                .next_after
                .map(|after| members_token(&r.org_id, &after))
                .unwrap_or_default(),
            members: page
                .members
                .into_iter()
                .map(|(member_id, role)| pb::OrgMember {
                    member_id,
                    role: role.as_str().to_owned(),
                })
                .collect(),
        }))
    }

    async fn set_allocation(
        &self,
        request: Request<pb::SetAllocationRequest>,
    ) -> Result<Response<pb::Allocation>, Status> {
        let r = request.into_inner();
        self.allocation(
            r.org_id,
            r.actor_id,
            r.member_id,
            r.wallet,
            AllocationChange::Set(r.amount),
            r.idempotency_key,
        )
        .await
    }

    async fn add_allocation(
        &self,
        request: Request<pb::AddAllocationRequest>,
    ) -> Result<Response<pb::Allocation>, Status> {
        let r = request.into_inner();
        self.allocation(
            r.org_id,
            r.actor_id,
            r.member_id,
            r.wallet,
            AllocationChange::Add(r.delta),
            r.idempotency_key,
        )
        .await
    }

    async fn set_budget(
        &self,
        request: Request<pb::SetBudgetRequest>,
    ) -> Result<Response<pb::Budget>, Status> {
        let r = request.into_inner();
        let mut v = Violations::default();
        let period = BudgetPeriod::parse(&r.period, r.window_secs, &mut v);
        let cmd = SetBudget {
            account_id: r.account_id,
            member_id: r.member_id,
            wallet: wallet_or_default(r.wallet),
            limit: r.limit,
            period: period.unwrap_or(BudgetPeriod::Day),
            utc_offset_minutes: r.utc_offset_minutes,
            idempotency_key: r.idempotency_key,
        };
        // Every bad field at once: the period's, then the command's.
        if let Some(bad) = v.finish().err() {
            let mut all = bad;
            if let Err(more) = self.ledger.check_budget(&cmd) {
                all.extend(more);
            }
            return Err(to_status(LedgerError::InvalidArgument(all)));
        }
        let event = self.ledger.set_budget(&cmd).await.map_err(to_status)?;
        let view = self
            .ledger
            .view(&cmd.account_id, &cmd.member_id, &cmd.wallet)
            .await
            .map_err(to_status)?;
        let scope = if cmd.member_id.is_empty() {
            "account"
        } else {
            "member"
        };
        let state = view.budgets.into_iter().find(|b| b.scope == scope);
        Ok(Response::new(pb::Budget {
            account_id: cmd.account_id,
            member_id: cmd.member_id,
            wallet: cmd.wallet,
            limit: cmd.limit,
            period: cmd.period.name().to_owned(),
            window_secs: r.window_secs,
            spent: state.as_ref().map(|b| b.spent).unwrap_or(0),
            resets_at_ms: state.as_ref().map(|b| b.resets_at_ms).unwrap_or(0),
            scope: scope.to_owned(),
            event_id: event.event_id,
            replayed: event.replayed,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn members_tokens_round_trip_bound_to_their_org() {
        use crate::api::metering::UNKNOWN_TOKEN;
        let token = members_token("acme", "bob@example.com");
        assert_eq!(
            parse_members_token(&token, "acme"),
            Ok("bob@example.com".to_owned())
        );
        assert_eq!(parse_members_token("", "acme"), Ok(String::new()));
        assert_eq!(
            parse_members_token(&token, "globex"),
            Err(MEMBERS_FOREIGN_TOKEN)
        );
        // Another listing's token, and forged ones, are no members token.
        let lots = crate::api::metering::lots_token(
            "acme",
            "",
            &crate::ledger::LotCursor {
                expired: false,
                score: 1,
                lot_id: "1".into(),
            },
        );
        let binding = members_binding("acme");
        let forged = |text: &str| format!("m{}", hex::encode(text));
        for bad in [
            lots,
            "m".into(),
            "mzz".into(),
            token.replacen('m', "c", 1),
            forged("bob"),
            forged(&format!("/{binding}")),
            forged(&format!("b/b/{binding}")),
            forged(&format!("bob\0/{binding}")),
            forged("bob/xyz"),
        ] {
            assert_eq!(
                parse_members_token(&bad, "acme"),
                Err(UNKNOWN_TOKEN),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn delivery_tokens_round_trip() {
        let c = DeliveryCursor {
            position: (1_700_000_000_000, 3, 1),
            delivery_id: "dlv_0123456789abcdef01234567".into(),
        };
        let binding = delivery_binding("acct", "failed", "");
        assert_ne!(binding, delivery_binding("acct", "", "failed"));
        assert_eq!(
            parse_delivery_token(&delivery_token(&c, &binding)),
            Some((c.clone(), Some(binding)))
        );
        // An older tollgate's token, without a binding.
        assert_eq!(
            parse_delivery_token(&hex::encode(format!("1700000000000/3/1/{}", c.delivery_id))),
            Some((c.clone(), None))
        );
        assert_eq!(
            parse_delivery_token(&hex::encode(format!("1/3/1/{}/zz", c.delivery_id))),
            None
        );
        // Only a delivery id's shape is taken: a NUL byte reached the store.
        for id in [
            "dlv_0123",
            "dlv_0123456789abcdef0123456\0",
            "dlv_0123456789ABCDEF01234567",
        ] {
            assert_eq!(
                parse_delivery_token(&hex::encode(format!("1/2/3/{id}"))),
                None
            );
        }
        assert_eq!(parse_delivery_token("zz"), None);
        assert_eq!(parse_delivery_token(&hex::encode("1/2/x/id")), None);
    }
}
