//! The price book: which operation a request is, and what it costs. Pure: parsed and
//! validated once (every bad setting reported with its path, all at once), then matched
//! and priced in memory on every check.
//!
//! ```toml
//! [pricebook]
//! default = "deny"                      # no route matched: "deny", "free" or an operation
//!
//! [[pricebook.routes]]
//! method = "POST"                       # optional: any method
//! host = "api.example.com"              # optional: any host (case-insensitive, port ignored)
//! path = "/v1/documents/{id}/ocr"       # exact, `{name}` = one segment; or path_prefix,
//! operation = "ocr.pages"               # or grpc_method = "pkg.Service/Method"
//!
//! [pricebook.operations."ocr.pages"]
//! mode = "hold"                         # or "debit" (default)
//! base = 50
//! hold_ttl_ms = 60000
//! capture_per_unit = 2
//! ```

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};

use serde::Deserialize;

use super::aliases::HeaderAliases;
use crate::config::{table_fields, toml_key, ConfigError, ConfigErrors};
use crate::ledger::command::{
    Violations, CREDITS_MAX, DEFAULT_WALLET, HOLD_TTL_MS_MAX, OPERATION_LEN_MAX,
};
use crate::ledger::OnExpiry;

/// The request header units are read from unless an operation names another.
pub const DEFAULT_UNITS_HEADER: &str = "x-tollgate-units";
/// Units a request declares when its units header is absent, unless configured.
pub const DEFAULT_UNITS: u64 = 1;
/// Most units one request may declare, unless configured.
pub const DEFAULT_UNITS_MAX: u64 = 10_000;
/// Upper bound of any `units_max`: keeps `per_unit × units` far from overflow.
pub const UNITS_MAX_LIMIT: u64 = 1_000_000_000;
/// Routes in one price book (first match wins; matching walks a [`RouteIndex`], so this
/// bounds the memory and the load time, not the cost of a request).
pub const ROUTES_MAX: usize = 10_000;
pub const OPERATIONS_MAX: usize = 10_000;
pub const VARIANTS_MAX: usize = 64;
/// Longest variant value, in bytes: a book's, and a request's (trimmed) before it is
/// looked up. A longer request value is a 400 that names the header without repeating
/// the value, so a client cannot make tollgate echo a header of any size.
pub const VARIANT_VALUE_LEN_MAX: usize = 128;
/// Longest header value tollgate parses as a number of units.
const UNITS_DIGITS_MAX: usize = 18;

/// Route targets that are not operations.
const TARGET_DENY: &str = "deny";
const TARGET_FREE: &str = "free";

/// A validated price book.
#[derive(Debug, Clone, PartialEq)]
pub struct PriceBook {
    routes: Vec<Route>,
    /// `routes` by host and path segments: what [`PriceBook::route`] walks.
    index: RouteIndex,
    operations: Vec<Operation>,
    by_name: HashMap<String, usize>,
    default: Target,
    /// [`PriceBook::request_headers`], made once per book (at load and at every reload):
    /// Envoy's Check answer reads it on every allowed request.
    request_headers: Vec<String>,
    /// [`PriceBook::request_header_aliases`], made with `request_headers`.
    request_header_aliases: HeaderAliases,
}

impl Default for PriceBook {
    /// No routes; every request is denied: a gateway must be told what to charge.
    fn default() -> Self {
        Self {
            routes: Vec::new(),
            index: RouteIndex::default(),
            operations: Vec::new(),
            by_name: HashMap::new(),
            default: Target::Deny,
            request_headers: Vec::new(),
            request_header_aliases: HeaderAliases::default(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Target {
    Deny,
    Free,
    Operation(usize),
}

/// What the price book says about a request.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Routed<'a> {
    /// No route (and the default is deny), or a route that denies.
    Deny,
    /// Allowed without identity or charge.
    Free,
    Operation(&'a Operation),
}

impl<'a> Routed<'a> {
    /// The price-book target's name: the operation's, or `free` / `deny` (reserved: no
    /// operation has them). The `operation` label of the check metrics.
    pub fn name(&self) -> &'a str {
        match self {
            Routed::Operation(op) => &op.name,
            Routed::Free => TARGET_FREE,
            Routed::Deny => TARGET_DENY,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
struct Route {
    method: Option<String>,
    host: Option<String>,
    path: PathPattern,
    target: Target,
    /// Whether one trailing `/` is no part of the path ([`PathPattern::matches`]): for
    /// `path` and `path_prefix` routes that charge or deny; never for a free route (it
    /// would make free what a later route charges) nor a gRPC method (no gRPC server
    /// serves `/pkg.Service/Method/`).
    fold_slash: bool,
    /// Whether a literal segment matches whatever the ASCII case of the request's (the
    /// pattern kept lowercase, the request path lowercased when it holds a capital): for
    /// routes that charge or deny, as Express (by default) and ASP.NET Core route, so a
    /// capital is no way around the price. A free route matches as written: widened, it
    /// would make free what a later route charges on an upstream that tells the two apart.
    fold_case: bool,
    /// A route matched as written whose pattern holds an ASCII capital: the index (its
    /// literals lowercase) finds it for every spelling, so a match is checked against the
    /// path as sent.
    written_upper: bool,
}

impl Route {
    fn matches_method(&self, method: &str) -> bool {
        self.method.as_deref().is_none_or(|m| {
            // Most servers answer HEAD by running the GET handler (and dropping the body):
            // the work of a GET, priced as one.
            m.eq_ignore_ascii_case(method)
                || (m.eq_ignore_ascii_case("GET") && method.eq_ignore_ascii_case("HEAD"))
        })
    }

    /// This route, matching literal segments whatever their ASCII case ([`Route::fold_case`]).
    fn folding_case(self) -> Self {
        Self {
            path: self.path.to_ascii_lowercase(),
            fold_case: true,
            written_upper: false,
            ..self
        }
    }

    /// Whether the route's path matches `path` (a request's, as sent): with its slash and
    /// case folding. Allocates when it folds case and `path` holds a capital: for loading
    /// a book, not for routing ([`PriceBook::first_route`] lowercases a path once).
    fn matches_path(&self, path: &str) -> bool {
        if self.fold_case && path.bytes().any(|b| b.is_ascii_uppercase()) {
            self.path
                .matches(&path.to_ascii_lowercase(), self.fold_slash)
        } else {
            self.path.matches(path, self.fold_slash)
        }
    }

    /// Whether every request whose method this route's `later` matches, this one matches.
    fn covers_methods_of(&self, later: &Route) -> bool {
        match (&self.method, &later.method) {
            (None, _) => true,
            (Some(_), None) => false,
            (Some(m), Some(l)) => m == l || (m == "GET" && l == "HEAD"),
        }
    }

    /// Paths that, matched by an earlier route, show that it matches every path this
    /// one does: its own path with [`ANY_SEGMENT`] for each `{param}` (with and without
    /// a trailing `/` when it folds one), or its prefix followed by [`ANY_SEGMENT`] (and
    /// the prefix without its `/` when it folds one). An earlier route's literal segment
    /// never matches `ANY_SEGMENT`, and only a prefix that ends before it does.
    ///
    /// Taken before the route folds case ([`Route::folding_case`]): they are the requests
    /// spelled as the book writes the route. A route that folds case behind a free one
    /// matched as written also matches other spellings, which the free one does not; but
    /// a charged `/v1/docs/{id}` after a free `/v1/` prefix is still a price no request
    /// written so pays, and refused.
    fn witnesses(&self) -> Vec<String> {
        let written = match &self.path {
            PathPattern::Exact(p) => p.clone(),
            PathPattern::Segments(segments) => segments
                .iter()
                .map(|s| s.as_deref().unwrap_or(ANY_SEGMENT))
                .collect::<Vec<_>>()
                .join("/"),
            PathPattern::Prefix(p) => {
                let mut out = vec![format!("{p}{ANY_SEGMENT}")];
                if self.fold_slash && p.len() > 1 {
                    out.extend(p.strip_suffix('/').map(str::to_owned));
                }
                return out;
            }
        };
        if !self.fold_slash {
            return vec![written];
        }
        let bare = without_trailing_slash(&written);
        if bare == "/" {
            // `//` is no request path (normal_path refuses it).
            return vec![bare.to_owned()];
        }
        vec![bare.to_owned(), format!("{bare}/")]
    }
}

#[derive(Debug, Clone, PartialEq)]
enum PathPattern {
    Exact(String),
    Prefix(String),
    /// Literal segments and `{param}` segments (None), matched segment by segment.
    Segments(Vec<Option<String>>),
}

impl PathPattern {
    fn to_ascii_lowercase(&self) -> Self {
        match self {
            Self::Exact(p) => Self::Exact(p.to_ascii_lowercase()),
            Self::Prefix(p) => Self::Prefix(p.to_ascii_lowercase()),
            Self::Segments(segments) => Self::Segments(
                segments
                    .iter()
                    .map(|s| s.as_ref().map(|s| s.to_ascii_lowercase()))
                    .collect(),
            ),
        }
    }

    fn has_ascii_uppercase(&self) -> bool {
        let upper = |s: &str| s.bytes().any(|b| b.is_ascii_uppercase());
        match self {
            Self::Exact(p) | Self::Prefix(p) => upper(p),
            Self::Segments(segments) => segments.iter().flatten().any(|s| upper(s)),
        }
    }

    /// The pattern as the book wrote it, a `{param}` as `{}`: what two routes that
    /// differ only in case are told apart by ([`PriceBook::from_toml`]).
    fn text(&self) -> String {
        match self {
            Self::Exact(p) | Self::Prefix(p) => p.clone(),
            Self::Segments(segments) => segments
                .iter()
                .map(|s| s.as_deref().unwrap_or("{}"))
                .collect::<Vec<_>>()
                .join("/"),
        }
    }

    /// With `fold_slash`, one trailing `/` is no part of an exact path or a pattern (of
    /// the route's or the request's), and a prefix ending in `/` also matches the path
    /// without it: most frameworks serve `/v1/envelopes/` as `/v1/envelopes` (Express by
    /// default, Spring before 6) and `/v1/reports` under a `/v1/reports/` router, so under
    /// a free default the slash would be a way around the route's price.
    fn matches(&self, path: &str, fold_slash: bool) -> bool {
        match self {
            Self::Exact(p) if fold_slash => {
                without_trailing_slash(p) == without_trailing_slash(path)
            }
            Self::Exact(p) => p == path,
            Self::Prefix(p) => {
                path.starts_with(p.as_str())
                    || (fold_slash && p.len() > 1 && p.strip_suffix('/') == Some(path))
            }
            Self::Segments(pattern) => {
                let (pattern, path) = if fold_slash {
                    let trimmed = match pattern.split_last() {
                        Some((Some(last), rest)) if last.is_empty() && !rest.is_empty() => rest,
                        _ => pattern.as_slice(),
                    };
                    (trimmed, without_trailing_slash(path))
                } else {
                    (pattern.as_slice(), path)
                };
                let mut actual = path.split('/');
                for want in pattern {
                    match (want, actual.next()) {
                        (_, None) => return false,
                        (Some(literal), Some(seg)) if literal == seg => {}
                        (None, Some(seg)) if !seg.is_empty() => {}
                        _ => return false,
                    }
                }
                actual.next().is_none()
            }
        }
    }
}

/// `path` without one trailing `/`, but `/` itself as it is.
fn without_trailing_slash(path: &str) -> &str {
    match path.strip_suffix('/') {
        Some(rest) if !rest.is_empty() => rest,
        _ => path,
    }
}

/// Most `/`-separated segments in a route's path: bounds the depth of [`RouteIndex`] and
/// so of a match's walk down it (a recursion, one frame a segment).
pub const ROUTE_SEGMENTS_MAX: usize = 64;

/// Stands for a `{param}` segment in the paths a route is checked for shadowing by
/// ([`shadowing`]): not ASCII, so no route (in normal form) has it literally.
const ANY_SEGMENT: &str = "\u{fffd}";

/// The routes by host and path segments, so that routing a request walks its path down a
/// tree instead of trying every route: its cost depends on the path and on how many
/// routes share its segments, not on the size of the book. Its literals are lowercase, and
/// so is every path walked down it: a route matched as written ([`Route::written_upper`])
/// is checked against the path as sent.
#[derive(Debug, Clone, Default, PartialEq)]
struct RouteIndex {
    /// Routes without a `host`.
    any_host: Node,
    /// Routes with a `host` (lowercase, without port or final dot), by it.
    by_host: HashMap<String, Node>,
}

/// Where a request path has matched the segments that lead here.
#[derive(Debug, Clone, Default, PartialEq)]
struct Node {
    literal: HashMap<String, Node>,
    /// The next segment is a `{param}`: any non-empty one.
    param: Option<Box<Node>>,
    /// Exact and `{param}` routes whose path ends here, matched as written.
    ends: Vec<usize>,
    /// Those matched with one trailing `/` folded ([`PathPattern::matches`]).
    ends_folded: Vec<usize>,
    /// Prefix routes whose prefix's last (maybe partial) segment follows here, by that
    /// segment; `prefix_lens` lists the lengths of those segments, each once, so that a
    /// request's segment is looked up once per length (a book-bound count, not per route).
    prefixes: HashMap<String, Vec<PrefixEntry>>,
    prefix_lens: Vec<usize>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
struct PrefixEntry {
    route: usize,
    /// The prefix ends in `/` and folds it: it also matches the path that ends here.
    matches_without_slash: bool,
}

/// A request path's segment counts, for [`Node::walk`].
struct PathEnds {
    /// Segments of the path as it is.
    all: usize,
    /// Segments of the path without one trailing `/` (what folding routes match).
    folded: usize,
}

impl RouteIndex {
    fn insert(&mut self, index: usize, route: &Route) {
        let mut node = match &route.host {
            Some(host) => self.by_host.entry(host.clone()).or_default(),
            None => &mut self.any_host,
        };
        let literal_path;
        let segments: Vec<Option<&str>> = match &route.path {
            PathPattern::Exact(p) => {
                literal_path = if route.fold_slash {
                    without_trailing_slash(p)
                } else {
                    p.as_str()
                };
                literal_path.split('/').map(Some).collect()
            }
            PathPattern::Segments(segments) => {
                let segments = match segments.split_last() {
                    Some((Some(last), rest))
                        if route.fold_slash && last.is_empty() && !rest.is_empty() =>
                    {
                        rest
                    }
                    _ => segments.as_slice(),
                };
                segments.iter().map(Option::as_deref).collect()
            }
            PathPattern::Prefix(p) => {
                let (head, last) = p.rsplit_once('/').unwrap_or(("", p.as_str()));
                for segment in head.split('/') {
                    node = node
                        .literal
                        .entry(segment.to_ascii_lowercase())
                        .or_default();
                }
                if !node.prefix_lens.contains(&last.len()) {
                    node.prefix_lens.push(last.len());
                    node.prefix_lens.sort_unstable();
                }
                node.prefixes
                    .entry(last.to_ascii_lowercase())
                    .or_default()
                    .push(PrefixEntry {
                        route: index,
                        matches_without_slash: route.fold_slash && p.len() > 1 && last.is_empty(),
                    });
                return;
            }
        };
        for segment in segments {
            node = match segment {
                Some(literal) => node
                    .literal
                    .entry(literal.to_ascii_lowercase())
                    .or_default(),
                None => node.param.get_or_insert_with(Box::default),
            };
        }
        if route.fold_slash {
            node.ends_folded.push(index);
        } else {
            node.ends.push(index);
        }
    }

    /// Calls `found` with every route whose host and path match (not its method, nor the
    /// case of a route matched as written: the caller's to judge); returns the nodes
    /// visited. `path` is lowercase (ASCII).
    fn matches(&self, host: &str, path: &str, found: &mut dyn FnMut(usize)) -> usize {
        let all = path.bytes().filter(|b| *b == b'/').count() + 1;
        let ends = PathEnds {
            all,
            folded: if without_trailing_slash(path).len() < path.len() {
                all - 1
            } else {
                all
            },
        };
        let mut visited = 0;
        self.any_host
            .walk(0, path.split('/'), &ends, found, &mut visited);
        if !host.is_empty() && !self.by_host.is_empty() {
            let host = if host.bytes().any(|b| b.is_ascii_uppercase()) {
                Cow::Owned(host.to_ascii_lowercase())
            } else {
                Cow::Borrowed(host)
            };
            if let Some(node) = self.by_host.get(host.as_ref()) {
                node.walk(0, path.split('/'), &ends, found, &mut visited);
            }
        }
        visited
    }
}

impl Node {
    /// Matches the rest of a path from here (`depth` segments taken), depth first. Every
    /// node is reached by one sequence of segments, so no node is visited twice, and the
    /// recursion is as deep as the longest route ([`ROUTE_SEGMENTS_MAX`]).
    fn walk(
        &self,
        depth: usize,
        mut rest: std::str::Split<'_, char>,
        ends: &PathEnds,
        found: &mut dyn FnMut(usize),
        visited: &mut usize,
    ) {
        *visited += 1;
        if depth == ends.all {
            self.ends.iter().for_each(|&i| found(i));
            if let Some(entries) = self.prefixes.get("") {
                entries
                    .iter()
                    .filter(|e| e.matches_without_slash)
                    .for_each(|e| found(e.route));
            }
        }
        if depth == ends.folded {
            self.ends_folded.iter().for_each(|&i| found(i));
        }
        let Some(segment) = rest.next() else {
            return;
        };
        for &len in &self.prefix_lens {
            if len > segment.len() {
                break;
            }
            let Some(start) = segment.get(..len) else {
                continue;
            };
            if let Some(entries) = self.prefixes.get(start) {
                entries.iter().for_each(|e| found(e.route));
            }
        }
        if let Some(child) = self.literal.get(segment) {
            child.walk(depth + 1, rest.clone(), ends, found, visited);
        }
        if let Some(child) = self.param.as_deref().filter(|_| !segment.is_empty()) {
            child.walk(depth + 1, rest, ends, found, visited);
        }
    }
}

/// One priced operation.
#[derive(Debug, Clone, PartialEq)]
pub struct Operation {
    pub name: String,
    pub wallet: String,
    pub mode: Mode,
    pub base: i64,
    /// `per_unit × units` from a request header.
    pub units: Option<Units>,
    /// Surcharges by the value of a request header.
    pub variants: Option<Variants>,
    pub fail_policy: FailPolicy,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Mode {
    Debit,
    Hold(HoldPolicy),
}

/// How a hold-mode operation holds and settles.
#[derive(Debug, Clone, PartialEq)]
pub struct HoldPolicy {
    pub ttl_ms: i64,
    pub on_expiry: OnExpiry,
    /// Captured per unit the upstream reports in `capture_units_header`.
    pub capture_per_unit: i64,
    pub capture_units_header: String,
    /// Upstream statuses that capture; any other releases.
    pub capture_statuses: Vec<StatusRange>,
}

/// An HTTP status or a class of them (`"2xx"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatusRange {
    pub first: u32,
    pub last: u32,
}

impl StatusRange {
    fn parse(text: &str) -> Option<Self> {
        let bytes = text.as_bytes();
        if bytes.len() != 3 {
            return None;
        }
        if bytes[1..].eq_ignore_ascii_case(b"xx") && (b'1'..=b'5').contains(&bytes[0]) {
            let first = u32::from(bytes[0] - b'0') * 100;
            return Some(Self {
                first,
                last: first + 99,
            });
        }
        let code: u32 = text.parse().ok()?;
        (100..=599).contains(&code).then_some(Self {
            first: code,
            last: code,
        })
    }

    pub fn contains(&self, status: u32) -> bool {
        (self.first..=self.last).contains(&status)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Units {
    pub per_unit: i64,
    pub header: String,
    pub default: u64,
    pub max: u64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Variants {
    pub header: String,
    /// A request without the header is refused (else it pays no surcharge).
    pub required: bool,
    /// By lowercase header value.
    pub values: BTreeMap<String, Variant>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Variant {
    pub flat: i64,
    pub units: Option<Units>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailPolicy {
    /// Redis unavailable: deny with 503.
    FailClosed,
    /// Redis unavailable: allow, uncharged, marked `x-tollgate-degraded: 1`.
    FailOpen,
}

/// A request header that makes a request impossible to price.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadHeader {
    pub header: String,
    pub message: String,
}

/// How a hold ends, decided from the upstream's answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settlement {
    /// Capture this much, or (None) everything held.
    Capture(Option<i64>),
    Release,
}

impl HoldPolicy {
    /// Capture on a configured status with the units the upstream reported (capped at
    /// what is held; everything held when it reported none), release otherwise.
    pub fn settle(&self, status: u32, units: Option<&str>, held: Option<i64>) -> Settlement {
        if !self.capture_statuses.iter().any(|r| r.contains(status)) {
            return Settlement::Release;
        }
        let Some(units) = units else {
            return Settlement::Capture(None);
        };
        let Ok(units) = parse_units(units, UNITS_MAX_LIMIT) else {
            // The upstream's mistake ("2.5", "3 pages"): the hold is its ceiling, taken
            // whole, and said so (the header's name only: nothing the client sent).
            tracing::warn!(
                header = %self.capture_units_header,
                "the upstream reported units that are not a whole number: capturing the whole hold"
            );
            return Settlement::Capture(None);
        };
        // Never past what a hold can hold, so a capture without the held amount is not
        // refused as a bad amount (and the hold left to its on_expiry).
        let amount = i64::try_from(units)
            .ok()
            .and_then(|u| u.checked_mul(self.capture_per_unit))
            .unwrap_or(CREDITS_MAX)
            .min(CREDITS_MAX);
        match held {
            Some(held) => Settlement::Capture(Some(amount.min(held))),
            None => Settlement::Capture(Some(amount)),
        }
    }

    /// The terms a hold is settled by — `capture_per_unit;capture_statuses;units header`,
    /// e.g. `2;200-299,404-404;x-tollgate-units` — carried from the Check that placed the
    /// hold to its access-log entry (Envoy's dynamic metadata), so that a price book
    /// reloaded in between does not settle it by a rate or statuses that were not in
    /// force when it was placed ([`HoldPolicy::from_capture_terms`]).
    pub fn capture_terms(&self) -> String {
        let mut out = self.capture_per_unit.to_string();
        out.push(';');
        for (i, r) in self.capture_statuses.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            out.push_str(&format!("{}-{}", r.first, r.last));
        }
        out.push(';');
        out.push_str(&self.capture_units_header);
        out
    }

    /// Reads [`HoldPolicy::capture_terms`] back (for settling only: its TTL and
    /// `on_expiry` are not in them); `None` for anything a price book could not have
    /// said, which the caller settles by the current book instead.
    pub fn from_capture_terms(text: &str) -> Option<Self> {
        let mut parts = text.splitn(3, ';');
        let per_unit: i64 = parts.next()?.parse().ok()?;
        let statuses = parts.next()?;
        let header = parts.next()?;
        if !(1..=CREDITS_MAX).contains(&per_unit)
            || header.is_empty()
            || !header.bytes().all(|b| {
                b.is_ascii_lowercase() || b.is_ascii_digit() || b"!#$%&'*+-.^_`|~".contains(&b)
            })
        {
            return None;
        }
        let mut capture_statuses = Vec::new();
        for range in statuses.split(',') {
            let (first, last) = range.split_once('-')?;
            let (first, last): (u32, u32) = (first.parse().ok()?, last.parse().ok()?);
            if !(100..=599).contains(&first) || !(first..=599).contains(&last) {
                return None;
            }
            capture_statuses.push(StatusRange { first, last });
        }
        Some(Self {
            ttl_ms: 1,
            on_expiry: OnExpiry::Release,
            capture_per_unit: per_unit,
            capture_units_header: header.to_owned(),
            capture_statuses,
        })
    }

    /// What settles a hold of an operation the price book no longer has: capture all on
    /// 2xx, release otherwise.
    pub fn fallback() -> Self {
        Self {
            ttl_ms: 1,
            on_expiry: OnExpiry::Release,
            capture_per_unit: 1,
            capture_units_header: DEFAULT_UNITS_HEADER.into(),
            capture_statuses: vec![StatusRange {
                first: 200,
                last: 299,
            }],
        }
    }
}

/// Units in a header: ASCII digits, at most `max`.
fn parse_units(text: &str, max: u64) -> Result<u64, String> {
    let text = text.trim();
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err("must be a non-negative integer".into());
    }
    if text.len() > UNITS_DIGITS_MAX {
        return Err(format!("must be at most {max}"));
    }
    match text.parse::<u64>() {
        Ok(n) if n <= max => Ok(n),
        _ => Err(format!("must be at most {max}")),
    }
}

impl Units {
    /// The cost of the units the request declares (its header's, or the default), and
    /// the declared count noted in `inputs` when the header is there.
    fn cost<'h>(
        &self,
        headers: &dyn Fn(&str) -> Option<&'h str>,
        inputs: &mut PriceInputs,
    ) -> Result<i64, BadHeader> {
        let units = match headers(&self.header) {
            Some(text) => {
                let units = parse_units(text, self.max).map_err(|message| BadHeader {
                    header: self.header.clone(),
                    message,
                })?;
                inputs.note(&self.header, &units.to_string());
                units
            }
            None => self.default,
        };
        // units <= UNITS_MAX_LIMIT and per_unit <= CREDITS_MAX: the product fits an i128.
        let cost = i128::from(self.per_unit) * i128::from(units);
        i64::try_from(cost)
            .ok()
            .filter(|c| *c <= CREDITS_MAX)
            .ok_or_else(|| BadHeader {
                header: self.header.clone(),
                message: format!("makes the price exceed {CREDITS_MAX} credits"),
            })
    }
}

/// A request's price, and what the request said that the price was computed from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Quote {
    pub amount: i64,
    /// The priced headers the request carried, normalized: `<header>=<length>:<value>;`
    /// each (the unit count in decimal, the variant as the book names it), in the order
    /// the price reads them; empty when it carried none. What the caller asked for,
    /// whatever a book prices it at: a check's request digest covers it instead of the
    /// amount ([`crate::ledger::Debit::price_inputs`]), so a retry priced by a book
    /// reloaded since is the same request, and one with other units or another variant
    /// is not. A header the book reads no longer (or newly) changes it.
    pub inputs: String,
}

/// [`Quote::inputs`] as it is built.
struct PriceInputs(String);

impl PriceInputs {
    /// Header names hold no `=`, and the value's length makes the end of each entry
    /// unambiguous whatever a variant's name holds.
    fn note(&mut self, header: &str, value: &str) {
        use std::fmt::Write;
        let _infallible = write!(self.0, "{header}={}:{value};", value.len());
    }
}

impl Operation {
    /// The price of a request: base + per-unit cost + variant surcharge. `headers` looks a
    /// lowercase header name up.
    pub fn price<'h>(&self, headers: &dyn Fn(&str) -> Option<&'h str>) -> Result<i64, BadHeader> {
        self.quote(headers).map(|quote| quote.amount)
    }

    /// [`Operation::price`], with what the request said that it was computed from.
    pub fn quote<'h>(&self, headers: &dyn Fn(&str) -> Option<&'h str>) -> Result<Quote, BadHeader> {
        // Each part is at most CREDITS_MAX, so every partial sum fits an i64; a sum past
        // the limit names the header whose part took it there.
        let exceeds = |header: &str| BadHeader {
            header: header.to_owned(),
            message: format!("makes the price exceed {CREDITS_MAX} credits"),
        };
        let mut inputs = PriceInputs(String::new());
        let mut total = self.base;
        if let Some(units) = &self.units {
            total += units.cost(headers, &mut inputs)?;
            if total > CREDITS_MAX {
                return Err(exceeds(&units.header));
            }
        }
        if let Some(variants) = &self.variants {
            match headers(&variants.header) {
                Some(value) => {
                    let value = value.trim();
                    if value.len() > VARIANT_VALUE_LEN_MAX {
                        return Err(BadHeader {
                            header: variants.header.clone(),
                            message: format!("is longer than {VARIANT_VALUE_LEN_MAX} bytes"),
                        });
                    }
                    let value = value.to_ascii_lowercase();
                    let Some(variant) = variants.values.get(&value) else {
                        let known: Vec<&str> = variants.values.keys().map(String::as_str).collect();
                        return Err(BadHeader {
                            header: variants.header.clone(),
                            message: format!(
                                "unknown value {value:?}; expected one of {}",
                                known.join(", ")
                            ),
                        });
                    };
                    inputs.note(&variants.header, &value);
                    total += variant.flat;
                    if total > CREDITS_MAX {
                        return Err(exceeds(&variants.header));
                    }
                    if let Some(units) = &variant.units {
                        total += units.cost(headers, &mut inputs)?;
                        if total > CREDITS_MAX {
                            return Err(exceeds(&units.header));
                        }
                    }
                }
                None if variants.required => {
                    return Err(BadHeader {
                        header: variants.header.clone(),
                        message: "is required".into(),
                    })
                }
                None => {}
            }
        }
        Ok(Quote {
            amount: total,
            inputs: inputs.0,
        })
    }

    pub fn hold(&self) -> Option<&HoldPolicy> {
        match &self.mode {
            Mode::Hold(policy) => Some(policy),
            Mode::Debit => None,
        }
    }
}

/// Why a request path is refused before it is routed (a 400 `bad_path`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BadPath(pub &'static str);

/// The request path the price book matches (its query left out), in one normal form, or
/// why it has none.
///
/// The route tollgate prices and the resource the upstream serves must be one reading of
/// the path. An upstream that resolves `..`, merges `//`, decodes `%2F`, takes `\` for
/// `/` or strips `;` parameters (Tomcat, Jetty, Spring) would otherwise serve
/// `/public/../v1/documents` (priced by a free `/public/` prefix) as `/v1/documents`, or
/// `/v1/envelopes;x` (no route) as `/v1/envelopes`. So a path with a dot segment (`.`,
/// `..`, also percent-encoded), an empty segment inside it (`//`; a trailing `/` is fine),
/// a `;` (also `%3B`), a backslash, a `#`, an encoded slash or backslash (`%2F`, `%5C`;
/// kept, as `%2F`/`%5C`, with `encoded_slashes`) or a malformed percent-encoding is
/// refused. What upstreams read alike is made one: escapes of unreserved characters and
/// of the reserved ones a path may hold as they are (`:@!$&'()*+,=`) are decoded, bytes
/// above ASCII are encoded, and every escape left is upper-cased, so `/v1/%64ocs` is
/// `/v1/docs`, `/v1/reports%3Aexport` is `/v1/reports:export` and `/v1/café` is
/// `/v1/caf%C3%A9`. A plain ASCII path without `%` is not copied.
pub fn normal_path(path: &str, encoded_slashes: bool) -> Result<Cow<'_, str>, BadPath> {
    let path = path.split('?').next().unwrap_or(path);
    if path.contains('#') {
        return Err(BadPath("has a # (a fragment is never sent)"));
    }
    if path.contains('\\') {
        return Err(BadPath("has a backslash"));
    }
    if path.contains(';') {
        return Err(BadPath(
            "has a ; (servers read path parameters differently)",
        ));
    }
    let normal = if path.bytes().any(|b| b == b'%' || !b.is_ascii()) {
        Cow::Owned(normalize_escapes(path, encoded_slashes)?)
    } else {
        Cow::Borrowed(path)
    };
    let mut segments = normal.split('/').enumerate().peekable();
    while let Some((i, segment)) = segments.next() {
        if segment == "." || segment == ".." {
            return Err(BadPath("has a dot segment (. or ..)"));
        }
        if segment.is_empty() && i > 0 && segments.peek().is_some() {
            return Err(BadPath("has an empty segment (//)"));
        }
    }
    Ok(normal)
}

/// `path` with the escapes [`normal_path`] decodes decoded, bytes above ASCII encoded and
/// every other escape upper-cased: plain ASCII.
fn normalize_escapes(path: &str, encoded_slashes: bool) -> Result<String, BadPath> {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    let encode = |out: &mut String, byte: u8| {
        out.extend([
            '%',
            char::from(HEX[usize::from(byte >> 4)]),
            char::from(HEX[usize::from(byte & 0xf)]),
        ]);
    };
    let bytes = path.as_bytes();
    let mut out = String::with_capacity(bytes.len() + 8);
    let mut i = 0;
    while i < bytes.len() {
        let byte = bytes[i];
        if byte != b'%' {
            if byte.is_ascii() {
                out.push(char::from(byte));
            } else {
                encode(&mut out, byte);
            }
            i += 1;
            continue;
        }
        let digit = |at: usize| bytes.get(at).and_then(|b| char::from(*b).to_digit(16));
        let (Some(hi), Some(lo)) = (digit(i + 1), digit(i + 2)) else {
            return Err(BadPath("has a malformed percent-encoding"));
        };
        // Two hex digits: at most 0xff.
        let decoded = (hi * 16 + lo) as u8;
        let plain = decoded.is_ascii_alphanumeric() || b"-._~:@!$&'()*+,=".contains(&decoded);
        if plain {
            out.push(char::from(decoded));
        } else if decoded == b';' {
            return Err(BadPath(
                "has a ; (servers read path parameters differently)",
            ));
        } else if matches!(decoded, b'/' | b'\\') && !encoded_slashes {
            return Err(BadPath("has an encoded slash or backslash (%2F, %5C)"));
        } else {
            encode(&mut out, decoded);
        }
        i += 3;
    }
    Ok(out)
}

/// Why a route's path could never match a request path ([`normal_path`]): one in another
/// form (`/v1/%64ocs` for `/v1/docs`), or one that is refused.
fn not_normal(p: &str) -> Option<String> {
    match normal_path(p, true) {
        Err(BadPath(why)) => Some(format!("{why}: no request path like it is routed")),
        Ok(normal) if normal != p => Some(format!(
            "{p:?} is matched in its normal form: write it as {normal:?}"
        )),
        Ok(_) => None,
    }
}

impl PriceBook {
    /// The first route matching the request; the default when none does. `path` may carry
    /// a query string (ignored).
    pub fn route(&self, host: &str, method: &str, path: &str) -> Routed<'_> {
        self.route_visiting(host, method, path).0
    }

    /// [`PriceBook::route`], and how many index nodes it visited (what a request costs,
    /// counted by the tests).
    fn route_visiting(&self, host: &str, method: &str, path: &str) -> (Routed<'_>, usize) {
        let path = path.split(['?', '#']).next().unwrap_or(path);
        // `api.example.com.` is the same host (a client could pick that form to miss a
        // host route).
        let host = strip_port(host).trim_end_matches('.');
        let (first, visited) = self.first_route(host, method, path);
        (
            self.routed(first.map_or(self.default, |i| self.routes[i].target)),
            visited,
        )
    }

    /// The index of the first route matching a request (its `host` without port or final
    /// dot, its `path` without query), and the index nodes visited to find it.
    ///
    /// The index is walked with the path lowercased (copied only when it holds a capital);
    /// a route matched as written is then checked against the path as sent, when either
    /// holds a capital ([`Route::fold_case`]).
    fn first_route(&self, host: &str, method: &str, path: &str) -> (Option<usize>, usize) {
        let (lower, capitals) = if path.bytes().any(|b| b.is_ascii_uppercase()) {
            (Cow::Owned(path.to_ascii_lowercase()), true)
        } else {
            (Cow::Borrowed(path), false)
        };
        let mut first: Option<usize> = None;
        let visited = self.index.matches(host, &lower, &mut |i| {
            let route = &self.routes[i];
            if first.is_none_or(|f| i < f)
                && route.matches_method(method)
                && (route.fold_case
                    || !(capitals || route.written_upper)
                    || route.path.matches(path, route.fold_slash))
            {
                first = Some(i);
            }
        });
        (first, visited)
    }

    fn routed(&self, target: Target) -> Routed<'_> {
        match target {
            Target::Deny => Routed::Deny,
            Target::Free => Routed::Free,
            Target::Operation(i) => Routed::Operation(&self.operations[i]),
        }
    }

    /// Every request header a price reads: the units and variant headers of every
    /// operation (lowercase, sorted, each once). A gateway that forwards other spellings of
    /// them (`x_signers`, `x.signature.method`: Envoy does) must drop those, or a backend
    /// that maps header names to variables (CGI, WSGI, PHP) reads a value tollgate never
    /// priced.
    pub fn request_headers(&self) -> &[String] {
        &self.request_headers
    }

    /// [`PriceBook::request_headers`] indexed for [`HeaderAliases::is_alias`]: one look-up
    /// of a request header's name, however many headers the book prices.
    pub fn request_header_aliases(&self) -> &HeaderAliases {
        &self.request_header_aliases
    }

    pub fn operation(&self, name: &str) -> Option<&Operation> {
        self.by_name.get(name).map(|&i| &self.operations[i])
    }

    pub fn routes_len(&self) -> usize {
        self.routes.len()
    }

    /// Names of the operations (metric labels are bounded by these).
    pub fn operation_names(&self) -> impl Iterator<Item = &str> {
        self.operations.iter().map(|o| o.name.as_str())
    }

    /// The price book of a whole config file's text.
    pub fn from_config_text(text: &str) -> Result<Self, ConfigErrors> {
        let table: toml::Table = text.parse().map_err(|e: toml::de::Error| {
            ConfigErrors(vec![ConfigError {
                path: "(file)".into(),
                message: e.to_string().replace('\n', " "),
            }])
        })?;
        let mut errors = Vec::new();
        let book = Self::from_toml(table.get("pricebook"), &mut errors);
        if errors.is_empty() {
            Ok(book)
        } else {
            Err(ConfigErrors(errors))
        }
    }

    /// Compiles the `[pricebook]` table, appending every problem to `errors` with its
    /// path. Returns the default book when there are errors.
    pub fn from_toml(value: Option<&toml::Value>, errors: &mut Vec<ConfigError>) -> Self {
        let Some(value) = value else {
            return Self::default();
        };
        let before = errors.len();
        let raw: RawBook = table_fields(value, "pricebook", errors);
        let mut bad = |path: String, message: String| errors.push(ConfigError { path, message });

        let mut operations = Vec::new();
        let mut by_name = HashMap::new();
        if raw.operations.len() > OPERATIONS_MAX {
            bad(
                "pricebook.operations".into(),
                format!("more than {OPERATIONS_MAX} operations"),
            );
        }
        for (name, value) in &raw.operations {
            let path = format!("pricebook.operations.{}", toml_key(name));
            let mut local = Vec::new();
            let op: RawOperation = table_fields(value, &path, &mut local);
            for e in local {
                bad(e.path, e.message);
            }
            if let Some(op) = compile_operation(name, op, &path, &mut bad) {
                by_name.insert(name.clone(), operations.len());
                operations.push(op);
            }
        }
        let target = |name: &str| -> Option<Target> {
            match name {
                TARGET_DENY => Some(Target::Deny),
                TARGET_FREE => Some(Target::Free),
                _ => raw
                    .operations
                    .contains_key(name)
                    .then(|| by_name.get(name).map(|&i| Target::Operation(i)))
                    // A broken operation is reported at its own path; route it to deny.
                    .map(|t| t.unwrap_or(Target::Deny)),
            }
        };
        let default = match target(&raw.default) {
            Some(t) => t,
            None => {
                bad(
                    "pricebook.default".into(),
                    format!(
                        "{:?} is neither \"deny\", \"free\" nor an operation of pricebook.operations",
                        raw.default
                    ),
                );
                Target::Deny
            }
        };
        if raw.routes.len() > ROUTES_MAX {
            bad(
                "pricebook.routes".into(),
                format!("more than {ROUTES_MAX} routes"),
            );
        }
        let mut routes = Vec::new();
        // `pricebook.routes[i]` of each of `routes`.
        let mut route_paths = Vec::new();
        // Routes refused as differing from an earlier one only in case (not told again
        // that it shadows them).
        let mut case_refused = Vec::new();
        // The [`Route::witnesses`] of each of `routes`, as written.
        let mut witnesses = Vec::new();
        // By host, kind (prefix or not) and lowercase path: the first route written so,
        // its path field and its path as written.
        let mut by_folded_path: HashMap<FoldedPath, (usize, &str, String)> = HashMap::new();
        for (i, value) in raw.routes.iter().enumerate() {
            let path = format!("pricebook.routes[{i}]");
            let mut local = Vec::new();
            let r: RawRoute = table_fields(value, &path, &mut local);
            for e in local {
                bad(e.path, e.message);
            }
            let t = match target(&r.operation) {
                Some(t) => Some(t),
                None if r.operation.is_empty() => {
                    bad(format!("{path}.operation"), "is required".into());
                    None
                }
                None => {
                    bad(
                        format!("{path}.operation"),
                        format!(
                            "{:?} is neither \"deny\", \"free\" nor an operation of pricebook.operations",
                            r.operation
                        ),
                    );
                    None
                }
            };
            let field = if r.path.is_some() {
                "path"
            } else if r.path_prefix.is_some() {
                "path_prefix"
            } else {
                "grpc_method"
            };
            if let Some(route) = compile_route(r, &path, &mut bad) {
                // Two routes whose paths differ only in case: on an upstream that routes
                // ignoring case (Express, ASP.NET Core) they are one resource, priced two
                // ways by the case a client picks; on one that does not, a book that
                // tells them apart by case alone is too easily misread. Write them alike.
                let written = route.path.text();
                let key = (
                    route.host.clone(),
                    matches!(route.path, PathPattern::Prefix(_)),
                    written.to_ascii_lowercase(),
                );
                let mut refused = false;
                match by_folded_path.get(&key) {
                    Some((earlier, earlier_field, earlier_written))
                        if *earlier_written != written =>
                    {
                        bad(
                            format!("{path}.{field}"),
                            format!(
                                "{written:?} differs from {}.{earlier_field} ({earlier_written:?}) \
                                 only in letter case: a route that charges or denies matches a \
                                 path whatever its ASCII case (a free one as written); write the \
                                 two alike",
                                route_paths[*earlier]
                            ),
                        );
                        refused = true;
                    }
                    Some(_) => {}
                    None => {
                        by_folded_path.insert(key, (routes.len(), field, written));
                    }
                }
                let target = t.unwrap_or(Target::Deny);
                let route = Route {
                    target,
                    fold_slash: route.fold_slash && target != Target::Free,
                    ..route
                };
                witnesses.push(route.witnesses());
                routes.push(if target == Target::Free {
                    route
                } else {
                    route.folding_case()
                });
                route_paths.push(path);
                case_refused.push(refused);
            }
        }
        // Indexed in order; a route that an earlier one shadows (it matches every
        // request the later one does, so the later one never matches: a duplicate, or a
        // price the operator believes in and no request pays) is refused.
        let mut index = RouteIndex::default();
        for (i, route) in routes.iter().enumerate() {
            let shadowed = shadowing(&index, &routes, route, &witnesses[i]);
            if let Some(earlier) = shadowed.filter(|_| !case_refused[i]) {
                bad(
                    route_paths[i].clone(),
                    format!(
                        "never matches: {} (first match wins) matches every request it does",
                        route_paths[earlier]
                    ),
                );
            }
            index.insert(i, route);
        }
        if errors.len() > before {
            return Self::default();
        }
        let request_headers = request_headers(&operations);
        let request_header_aliases = HeaderAliases::new(&request_headers);
        Self {
            routes,
            index,
            operations,
            by_name,
            default,
            request_headers,
            request_header_aliases,
        }
    }
}

/// A route's host, kind (a prefix or not) and path in lowercase: two routes alike in these
/// but not in their paths as written differ only in case.
type FoldedPath = (Option<String>, bool, String);

/// The first of the routes in `index` (those before `route`) that matches every request
/// `route` does, spelled as written: one that matches each of its `witnesses` (its
/// [`Route::witnesses`] before it folds case; found by walking the
/// index with the first, checked with [`Route::matches_path`]), on the same host or any,
/// for its methods. Only a prefix matches the unbounded paths of a prefix.
fn shadowing(
    index: &RouteIndex,
    routes: &[Route],
    route: &Route,
    witnesses: &[String],
) -> Option<usize> {
    // The index finds routes matched as written for any spelling: each witness, the
    // first included, is checked with the earlier route's own matching.
    let first = witnesses.first()?.to_ascii_lowercase();
    let mut found = None;
    index.matches(route.host.as_deref().unwrap_or(""), &first, &mut |i| {
        let earlier = &routes[i];
        let covers = found.is_none_or(|f| i < f)
            && earlier.covers_methods_of(route)
            && (matches!(earlier.path, PathPattern::Prefix(_))
                || !matches!(route.path, PathPattern::Prefix(_)))
            && witnesses.iter().all(|w| earlier.matches_path(w));
        if covers {
            found = Some(i);
        }
    });
    found
}

/// The request headers `operations` price by ([`PriceBook::request_headers`]).
fn request_headers(operations: &[Operation]) -> Vec<String> {
    let mut out = Vec::new();
    for op in operations {
        if let Some(units) = &op.units {
            out.push(units.header.clone());
        }
        if let Some(variants) = &op.variants {
            out.push(variants.header.clone());
            out.extend(
                variants
                    .values
                    .values()
                    .filter_map(|v| v.units.as_ref().map(|u| u.header.clone())),
            );
        }
    }
    out.sort_unstable();
    out.dedup();
    out
}

fn strip_port(host: &str) -> &str {
    if host.starts_with('[') {
        // [v6]:port
        return host
            .split_once(']')
            .map_or(host, |(h, _)| &host[..h.len() + 1]);
    }
    match host.rsplit_once(':') {
        Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => host,
    }
}

#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct RawBook {
    /// What a request no route matches gets: "deny", "free" or an operation.
    default: String,
    routes: Vec<toml::Value>,
    operations: BTreeMap<String, toml::Value>,
}

impl Default for RawBook {
    fn default() -> Self {
        Self {
            default: TARGET_DENY.into(),
            routes: Vec::new(),
            operations: BTreeMap::new(),
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct RawRoute {
    /// HTTP method; any when absent.
    method: Option<String>,
    /// Host; any when absent.
    host: Option<String>,
    /// Exact path; `{name}` matches one non-empty segment.
    path: Option<String>,
    path_prefix: Option<String>,
    /// `package.Service/Method`: matches `POST /package.Service/Method`.
    grpc_method: Option<String>,
    /// An operation name, "free" or "deny".
    operation: String,
}

fn compile_route(r: RawRoute, path: &str, bad: &mut impl FnMut(String, String)) -> Option<Route> {
    let mut ok = true;
    let mut method = r.method.map(|m| m.to_ascii_uppercase());
    if let Some(m) = &method {
        if m.is_empty() || !m.bytes().all(|b| b.is_ascii_uppercase()) {
            bad(
                format!("{path}.method"),
                format!("{m:?} is not an HTTP method"),
            );
            ok = false;
        }
    }
    // Matched against the request's host without its port and a final dot, so written
    // the same way: a port here would make a route that never matches.
    let host = r
        .host
        .map(|h| h.to_ascii_lowercase().trim_end_matches('.').to_owned());
    if let Some(h) = &host {
        if h.is_empty() || h.contains(['/', ' ']) {
            bad(format!("{path}.host"), format!("{h:?} is not a host name"));
            ok = false;
        } else if strip_port(h) != h {
            bad(
                format!("{path}.host"),
                "has a port: a request's port is ignored, name the host alone".to_owned(),
            );
            ok = false;
        }
    }
    let given = [&r.path, &r.path_prefix, &r.grpc_method]
        .iter()
        .filter(|p| p.is_some())
        .count();
    if given != 1 {
        bad(
            path.to_owned(),
            "needs exactly one of path, path_prefix, grpc_method".into(),
        );
        return None;
    }
    for (field, given) in [("path", &r.path), ("path_prefix", &r.path_prefix)] {
        if given
            .as_ref()
            .is_some_and(|p| p.split('/').count() > ROUTE_SEGMENTS_MAX)
        {
            bad(
                format!("{path}.{field}"),
                format!("has more than {ROUTE_SEGMENTS_MAX} segments"),
            );
            return None;
        }
    }
    let grpc = r.path.is_none() && r.path_prefix.is_none();
    let pattern = if let Some(p) = r.path {
        if !p.starts_with('/') {
            bad(format!("{path}.path"), "must start with /".into());
            ok = false;
        }
        if p.contains(['?', '#']) {
            bad(
                format!("{path}.path"),
                "may not hold a query or fragment".into(),
            );
            ok = false;
        } else if let Some(why) = not_normal(&p) {
            bad(format!("{path}.path"), why);
            ok = false;
        }
        if p.contains('{') || p.contains('}') {
            let mut segments = Vec::new();
            for seg in p.split('/') {
                let is_param = seg.len() > 2
                    && seg.starts_with('{')
                    && seg.ends_with('}')
                    && seg[1..seg.len() - 1]
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'_');
                if is_param {
                    segments.push(None);
                } else if seg.contains(['{', '}']) {
                    bad(
                        format!("{path}.path"),
                        format!("segment {seg:?}: a parameter is a whole segment {{name}}"),
                    );
                    ok = false;
                } else {
                    segments.push(Some(seg.to_owned()));
                }
            }
            PathPattern::Segments(segments)
        } else {
            PathPattern::Exact(p)
        }
    } else if let Some(p) = r.path_prefix {
        if !p.starts_with('/') {
            bad(format!("{path}.path_prefix"), "must start with /".into());
            ok = false;
        } else if let Some(why) = not_normal(&p) {
            bad(format!("{path}.path_prefix"), why);
            ok = false;
        }
        PathPattern::Prefix(p)
    } else {
        let g = r.grpc_method.unwrap_or_default();
        let g = g.trim_start_matches('/');
        let valid = g.split_once('/').is_some_and(|(service, m)| {
            !service.is_empty() && !m.is_empty() && !m.contains('/') && !g.contains(' ')
        });
        if !valid {
            bad(
                format!("{path}.grpc_method"),
                format!("{g:?} is not package.Service/Method"),
            );
            ok = false;
        }
        match &method {
            Some(m) if m != "POST" => {
                bad(
                    format!("{path}.method"),
                    "gRPC calls are POST requests".into(),
                );
                ok = false;
            }
            _ => method = Some("POST".into()),
        }
        PathPattern::Exact(format!("/{g}"))
    };
    ok.then_some(Route {
        method,
        host,
        fold_slash: !grpc,
        fold_case: false,
        written_upper: pattern.has_ascii_uppercase(),
        path: pattern,
        target: Target::Deny,
    })
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct RawOperation {
    /// Wallet charged; "default" when absent.
    wallet: Option<String>,
    /// "debit" (default) or "hold".
    mode: Option<String>,
    /// Credits every request costs.
    base: i64,
    /// Credits per unit the request declares in `units_header`.
    per_unit: i64,
    units_header: Option<String>,
    units_default: Option<u64>,
    units_max: Option<u64>,
    /// Header whose value picks a surcharge from `variants`.
    variant_header: Option<String>,
    variant_required: bool,
    variants: BTreeMap<String, toml::Value>,
    /// "fail_closed" (default) or "fail_open".
    fail_policy: Option<String>,
    // Hold mode only.
    hold_ttl_ms: Option<i64>,
    on_expiry: Option<String>,
    capture_per_unit: Option<i64>,
    capture_units_header: Option<String>,
    capture_statuses: Option<Vec<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct RawVariant {
    /// Flat surcharge.
    flat: i64,
    /// Surcharge per unit of `units_header`.
    per_unit: i64,
    units_header: Option<String>,
    units_default: Option<u64>,
    units_max: Option<u64>,
}

fn header_name(
    value: Option<String>,
    default: &str,
    path: String,
    bad: &mut impl FnMut(String, String),
) -> String {
    let name = value
        .unwrap_or_else(|| default.to_owned())
        .to_ascii_lowercase();
    let valid = !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b));
    if !valid {
        bad(path, format!("{name:?} is not a header name"));
    }
    name
}

fn credits_field(value: i64, path: String, bad: &mut impl FnMut(String, String)) {
    if !(0..=CREDITS_MAX).contains(&value) {
        bad(path, format!("must be in 0..={CREDITS_MAX}"));
    }
}

#[allow(clippy::too_many_arguments)]
fn compile_units(
    per_unit: i64,
    header: Option<String>,
    default: Option<u64>,
    max: Option<u64>,
    path: &str,
    bad: &mut impl FnMut(String, String),
) -> Option<Units> {
    credits_field(per_unit, format!("{path}.per_unit"), bad);
    let header = header_name(
        header,
        DEFAULT_UNITS_HEADER,
        format!("{path}.units_header"),
        bad,
    );
    let max = max.unwrap_or(DEFAULT_UNITS_MAX);
    if !(1..=UNITS_MAX_LIMIT).contains(&max) {
        bad(
            format!("{path}.units_max"),
            format!("must be in 1..={UNITS_MAX_LIMIT}"),
        );
    }
    let default = default.unwrap_or(DEFAULT_UNITS);
    if default > max {
        bad(
            format!("{path}.units_default"),
            format!("must be at most units_max ({max})"),
        );
    }
    (per_unit > 0).then_some(Units {
        per_unit,
        header,
        default,
        max,
    })
}

/// The most `units` can add to a price: `per_unit × units_max` (0 without units).
fn most_units_cost(units: &Option<Units>) -> i128 {
    units
        .as_ref()
        .map_or(0, |u| i128::from(u.per_unit) * i128::from(u.max))
}

fn compile_operation(
    name: &str,
    op: RawOperation,
    path: &str,
    bad: &mut impl FnMut(String, String),
) -> Option<Operation> {
    let mut local = Vec::new();
    let mut note = |p: String, m: String| local.push((p, m));
    if name == TARGET_DENY || name == TARGET_FREE {
        note(path.to_owned(), format!("{name:?} is reserved"));
    }
    let mut v = Violations::default();
    v.operation(path, name);
    if name.is_empty() || name.len() > OPERATION_LEN_MAX {
        v.add(path, format!("name must be 1..={OPERATION_LEN_MAX} bytes"));
    }
    let wallet = op.wallet.unwrap_or_else(|| DEFAULT_WALLET.to_owned());
    v.wallet(&format!("{path}.wallet"), &wallet);
    if wallet.is_empty() {
        v.add(&format!("{path}.wallet"), "may not be empty");
    }
    if let Err(violations) = v.finish() {
        for violation in violations {
            note(violation.field, violation.description);
        }
    }
    credits_field(op.base, format!("{path}.base"), &mut note);
    let units = compile_units(
        op.per_unit,
        op.units_header,
        op.units_default,
        op.units_max,
        path,
        &mut note,
    );
    // The dearest request is priced here, not first met by a client: a book whose base,
    // units and variants can add up past the limit is refused, naming the field that
    // takes it there (the price is checked again per request, `Operation::price`).
    let valid = |n: i64, units: &Option<Units>| {
        (0..=CREDITS_MAX).contains(&n)
            && units
                .as_ref()
                .is_none_or(|u| u.per_unit <= CREDITS_MAX && u.max <= UNITS_MAX_LIMIT)
    };
    let base_most = i128::from(op.base) + most_units_cost(&units);
    let base_valid = valid(op.base, &units);
    if base_valid && base_most > i128::from(CREDITS_MAX) {
        note(
            format!("{path}.units_max"),
            format!("base + per_unit × units_max is {base_most}, past the {CREDITS_MAX}-credit limit: such a request would be refused"),
        );
    }
    let variants = match op.variant_header {
        Some(header) => {
            let header = header_name(
                Some(header),
                "",
                format!("{path}.variant_header"),
                &mut note,
            );
            if op.variants.is_empty() {
                note(
                    format!("{path}.variants"),
                    "variant_header needs at least one variant".into(),
                );
            }
            if op.variants.len() > VARIANTS_MAX {
                note(
                    format!("{path}.variants"),
                    format!("more than {VARIANTS_MAX} variants"),
                );
            }
            let mut values = BTreeMap::new();
            for (value, raw) in &op.variants {
                let vpath = format!("{path}.variants.{}", toml_key(value));
                if value.is_empty() || *value != value.to_ascii_lowercase() {
                    note(
                        vpath.clone(),
                        "variant values are lowercase and non-empty".into(),
                    );
                } else if value.len() > VARIANT_VALUE_LEN_MAX {
                    note(
                        vpath.clone(),
                        format!("is longer than {VARIANT_VALUE_LEN_MAX} bytes: a request's value that long is refused"),
                    );
                } else if value.trim() != value {
                    // A request's value is trimmed before it is looked up.
                    note(
                        vpath.clone(),
                        "has spaces around it: a request's value is trimmed, so it would never match".into(),
                    );
                }
                let mut errs = Vec::new();
                let rv: RawVariant = table_fields(raw, &vpath, &mut errs);
                for e in errs {
                    note(e.path, e.message);
                }
                credits_field(rv.flat, format!("{vpath}.flat"), &mut note);
                let units = compile_units(
                    rv.per_unit,
                    rv.units_header,
                    rv.units_default,
                    rv.units_max,
                    &vpath,
                    &mut note,
                );
                let most = base_most + i128::from(rv.flat) + most_units_cost(&units);
                let checked =
                    base_valid && valid(rv.flat, &units) && base_most <= i128::from(CREDITS_MAX);
                if checked && i128::from(op.base) + i128::from(rv.flat) > i128::from(CREDITS_MAX) {
                    note(
                        format!("{vpath}.flat"),
                        format!("base + flat must be at most {CREDITS_MAX}: every request with this variant would be refused"),
                    );
                } else if checked && most > i128::from(CREDITS_MAX) {
                    let field = if units.is_some() { "units_max" } else { "flat" };
                    note(
                        format!("{vpath}.{field}"),
                        format!("base + per_unit × units_max + this variant's flat + per_unit × units_max is {most}, past the {CREDITS_MAX}-credit limit: such a request would be refused"),
                    );
                }
                values.insert(
                    value.clone(),
                    Variant {
                        flat: rv.flat,
                        units,
                    },
                );
            }
            Some(Variants {
                header,
                required: op.variant_required,
                values,
            })
        }
        None => {
            if !op.variants.is_empty() {
                note(
                    format!("{path}.variant_header"),
                    "is required when variants are given".into(),
                );
            }
            if op.variant_required {
                note(
                    format!("{path}.variant_required"),
                    "needs variant_header".into(),
                );
            }
            None
        }
    };
    let fail_policy = match op.fail_policy.as_deref() {
        None | Some("fail_closed") => FailPolicy::FailClosed,
        Some("fail_open") => FailPolicy::FailOpen,
        Some(other) => {
            note(
                format!("{path}.fail_policy"),
                format!("{other:?}: must be fail_closed or fail_open"),
            );
            FailPolicy::FailClosed
        }
    };
    let hold_only = [
        ("hold_ttl_ms", op.hold_ttl_ms.is_some()),
        ("on_expiry", op.on_expiry.is_some()),
        ("capture_per_unit", op.capture_per_unit.is_some()),
        ("capture_units_header", op.capture_units_header.is_some()),
        ("capture_statuses", op.capture_statuses.is_some()),
    ];
    let mode = match op.mode.as_deref() {
        None | Some("debit") => {
            for (field, given) in hold_only {
                if given {
                    note(format!("{path}.{field}"), "only for mode = \"hold\"".into());
                }
            }
            Mode::Debit
        }
        Some("hold") => {
            let ttl_ms = op.hold_ttl_ms.unwrap_or(0);
            if !(1..=HOLD_TTL_MS_MAX).contains(&ttl_ms) {
                note(
                    format!("{path}.hold_ttl_ms"),
                    format!("is required for holds, in 1..={HOLD_TTL_MS_MAX}"),
                );
            }
            let on_expiry = match op.on_expiry.as_deref() {
                None => OnExpiry::Release,
                Some(s @ ("capture" | "release")) => {
                    OnExpiry::parse(s).unwrap_or(OnExpiry::Release)
                }
                Some(other) => {
                    note(
                        format!("{path}.on_expiry"),
                        format!("{other:?}: must be capture or release"),
                    );
                    OnExpiry::Release
                }
            };
            let capture_per_unit = op.capture_per_unit.unwrap_or(1);
            if !(1..=CREDITS_MAX).contains(&capture_per_unit) {
                note(
                    format!("{path}.capture_per_unit"),
                    format!("must be in 1..={CREDITS_MAX}"),
                );
            }
            let capture_units_header = header_name(
                op.capture_units_header,
                DEFAULT_UNITS_HEADER,
                format!("{path}.capture_units_header"),
                &mut note,
            );
            let statuses = op.capture_statuses.unwrap_or_else(|| vec!["2xx".into()]);
            if statuses.is_empty() {
                note(
                    format!("{path}.capture_statuses"),
                    "needs at least one status".into(),
                );
            }
            let mut capture_statuses = Vec::new();
            for (i, s) in statuses.iter().enumerate() {
                match StatusRange::parse(s) {
                    Some(r) => capture_statuses.push(r),
                    None => note(
                        format!("{path}.capture_statuses[{i}]"),
                        format!("{s:?} is not a status (200) or a class (2xx)"),
                    ),
                }
            }
            Mode::Hold(HoldPolicy {
                ttl_ms,
                on_expiry,
                capture_per_unit,
                capture_units_header,
                capture_statuses,
            })
        }
        Some(other) => {
            note(
                format!("{path}.mode"),
                format!("{other:?}: must be debit or hold"),
            );
            Mode::Debit
        }
    };
    let ok = local.is_empty();
    for (p, m) in local {
        bad(p, m);
    }
    ok.then(|| Operation {
        name: name.to_owned(),
        wallet,
        mode,
        base: op.base,
        units,
        variants,
        fail_policy,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const ESIGN: &str = include_str!("../../examples/pricebook-esign.toml");

    fn book(text: &str) -> PriceBook {
        PriceBook::from_config_text(text).unwrap_or_else(|e| panic!("{e}"))
    }

    fn headers<'a>(pairs: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<&'a str> {
        move |name| pairs.iter().find(|(k, _)| *k == name).map(|(_, v)| *v)
    }

    fn price(book: &PriceBook, method: &str, path: &str, h: &[(&str, &str)]) -> i64 {
        match book.route("api.example.com", method, path) {
            Routed::Operation(op) => op.price(&headers(h)).expect("priced"),
            other => panic!("{path}: {other:?}"),
        }
    }

    /// A request's variant value is echoed in an unknown-value error only up to
    /// [`VARIANT_VALUE_LEN_MAX`] bytes (trimmed); a longer one is refused naming the header
    /// alone, so a client cannot make tollgate repeat a header of any size.
    #[test]
    fn a_variant_value_past_the_limit_is_refused_without_being_echoed() {
        let b = book(ESIGN);
        let Routed::Operation(op) = b.route("h", "POST", "/v1/envelopes") else {
            panic!("routed");
        };
        let at_limit = "q".repeat(VARIANT_VALUE_LEN_MAX);
        let padded = format!("  {at_limit}  ");
        let err = op
            .price(&headers(&[("x-signature-method", &padded)]))
            .expect_err("unknown");
        assert_eq!(err.header, "x-signature-method");
        assert!(
            err.message
                .starts_with(&format!("unknown value {at_limit:?}")),
            "{}",
            err.message
        );
        let past = "Q".repeat(VARIANT_VALUE_LEN_MAX + 1);
        let err = op
            .price(&headers(&[("x-signature-method", &past)]))
            .expect_err("too long");
        assert_eq!(err.header, "x-signature-method");
        assert_eq!(
            err.message,
            format!("is longer than {VARIANT_VALUE_LEN_MAX} bytes")
        );
        // A book's variant that long could never be picked: refused at load.
        let long = "v".repeat(VARIANT_VALUE_LEN_MAX + 1);
        let err = PriceBook::from_config_text(&format!(
            "[pricebook]\n[pricebook.operations.send]\nbase = 1\nvariant_header = \"x-sig\"\n\
             [pricebook.operations.send.variants]\n{long} = {{ flat = 1 }}\nses = {{ flat = 1 }}\n",
        ))
        .expect_err("refused");
        let paths: Vec<&str> = err.0.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(
            paths,
            [format!("pricebook.operations.send.variants.{long}")],
            "{err}"
        );
        let at_limit_book = format!(
            "[pricebook]\n[pricebook.operations.send]\nbase = 1\nvariant_header = \"x-sig\"\n\
             [pricebook.operations.send.variants]\n{} = {{ flat = 1 }}\n",
            "v".repeat(VARIANT_VALUE_LEN_MAX)
        );
        book(&at_limit_book);
    }

    /// A variant no request could pick (a request's value is trimmed) is refused.
    #[test]
    fn a_variant_value_with_spaces_around_it_is_refused() {
        let err = PriceBook::from_config_text(
            "[pricebook]\n[pricebook.operations.send]\nbase = 1\nvariant_header = \"x-sig\"\n\
             [pricebook.operations.send.variants]\n\"qes \" = { flat = 1 }\n\" aes\" = { flat = 1 }\nses = { flat = 1 }\n",
        )
        .expect_err("refused");
        let paths: Vec<&str> = err.0.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "pricebook.operations.send.variants.\" aes\"",
                "pricebook.operations.send.variants.\"qes \""
            ]
        );
    }

    /// A book whose dearest request passes the limit is refused when it loads (below);
    /// the price is still checked per request, where a sum past the limit names the
    /// header whose part took it there. The operation is built here as the book would
    /// have made it before that check.
    #[test]
    fn a_price_past_the_limit_names_the_header_that_took_it_there() {
        let max = CREDITS_MAX;
        let units = |per_unit, header: &str, max| Units {
            per_unit,
            header: header.into(),
            default: 0,
            max,
        };
        let op = Operation {
            name: "send".into(),
            wallet: DEFAULT_WALLET.into(),
            mode: Mode::Debit,
            base: max - 3,
            units: Some(units(1, "x-pages", 1000)),
            variants: Some(Variants {
                header: "x-sig".into(),
                required: false,
                values: BTreeMap::from([
                    (
                        "qes".to_owned(),
                        Variant {
                            flat: 2,
                            units: None,
                        },
                    ),
                    (
                        "aes".to_owned(),
                        Variant {
                            flat: 0,
                            units: Some(units(max / 2, "x-signers", 10)),
                        },
                    ),
                ]),
            }),
            fail_policy: FailPolicy::FailClosed,
        };
        let blame = |h: &[(&str, &str)]| op.price(&headers(h)).expect_err("past the limit").header;
        // The pages fit; the variant's flat surcharge takes the sum past the limit.
        assert_eq!(blame(&[("x-pages", "2"), ("x-sig", "qes")]), "x-sig");
        // No pages; the variant's own units do it.
        assert_eq!(blame(&[("x-sig", "aes"), ("x-signers", "1")]), "x-signers");
        // The pages alone do it.
        assert_eq!(blame(&[("x-pages", "4")]), "x-pages");
        assert_eq!(op.price(&headers(&[("x-pages", "3")])), Ok(max));
    }

    /// base + per_unit × units_max + the dearest variant (flat + per_unit × units_max)
    /// past 2^53−1 is a price-book error naming the field that takes it there, not a 400
    /// for the client who first sends that many units.
    #[test]
    fn a_book_whose_dearest_request_passes_the_limit_is_refused() {
        let max = CREDITS_MAX;
        let refused = |op: &str| {
            let err = PriceBook::from_config_text(&format!(
                "[pricebook]\ndefault = \"send\"\n[pricebook.operations.send]\n{op}\n"
            ))
            .expect_err(op);
            err.0.iter().map(|e| e.path.clone()).collect::<Vec<_>>()
        };
        let send = "pricebook.operations.send";
        assert_eq!(
            refused(&format!(
                "base = {}\nper_unit = 1\nunits_max = 1000",
                max - 999
            )),
            [format!("{send}.units_max")]
        );
        assert_eq!(
            refused(&format!(
                "base = {}\nper_unit = 1\nunits_max = 1000\nvariant_header = \"x-sig\"\n\
                 [pricebook.operations.send.variants]\nqes = {{ flat = 1 }}\nses = {{ flat = 0 }}\n\
                 aes = {{ per_unit = 1, units_header = \"x-signers\", units_max = 2 }}",
                max - 1000
            )),
            [
                format!("{send}.variants.aes.units_max"),
                format!("{send}.variants.qes.flat"),
            ]
        );
        // At the limit exactly: the dearest request costs CREDITS_MAX.
        let b = book(&format!(
            "[pricebook]\ndefault = \"send\"\n[pricebook.operations.send]\nbase = {}\n\
             per_unit = 1\nunits_max = 1000\nvariant_header = \"x-sig\"\n\
             [pricebook.operations.send.variants]\nqes = {{ flat = 1 }}",
            max - 1001
        ));
        let Routed::Operation(op) = b.route("h", "POST", "/x") else {
            panic!("not priced")
        };
        assert_eq!(
            op.price(&headers(&[("x-tollgate-units", "1000"), ("x-sig", "qes")])),
            Ok(max)
        );
    }

    /// The headers a price reads, listed once per book (Envoy's Check answer removes
    /// their aliases): units, variant and per-variant units headers, each once.
    #[test]
    fn the_book_lists_every_header_a_price_reads() {
        let b = book(
            r#"
            [pricebook]
            [pricebook.operations.send]
            base = 1
            per_unit = 1
            units_header = "X-Pages"
            variant_header = "x-sig"
            [pricebook.operations.send.variants]
            qes = { flat = 2 }
            aes = { per_unit = 1, units_header = "x-signers" }
            [pricebook.operations.ocr]
            base = 1
            per_unit = 1
            units_header = "x-pages"
            [pricebook.operations.flat]
            base = 1
            "#,
        );
        assert_eq!(b.request_headers(), ["x-pages", "x-sig", "x-signers"]);
        assert!(PriceBook::default().request_headers().is_empty());
    }

    #[test]
    fn a_variant_whose_flat_surcharge_passes_the_limit_is_refused() {
        let err = PriceBook::from_config_text(&format!(
            r#"
            [pricebook]
            default = "send"
            [pricebook.operations.send]
            base = {max}
            variant_header = "x-sig"
            [pricebook.operations.send.variants]
            qes = {{ flat = 1 }}
            ses = {{ flat = 0 }}
            "#,
            max = CREDITS_MAX,
        ))
        .expect_err("refused");
        let text = err.to_string();
        assert!(
            text.contains("pricebook.operations.send.variants.qes.flat"),
            "{text}"
        );
        assert!(!text.contains("variants.ses"), "{text}");
    }

    /// A quote's inputs are what the request asked for: the same under a book that
    /// prices it otherwise, different for other units or another variant, and normal
    /// (case, spaces, leading zeros) as the price reads them.
    #[test]
    fn a_quote_names_what_the_request_asked_for_whatever_its_price() {
        let cheap = book(ESIGN);
        let dear = book(&ESIGN.replace(
            "aadhaar = { per_unit = 15,",
            "aadhaar = { flat = 5, per_unit = 20,",
        ));
        let quote = |b: &PriceBook, h: &[(&str, &str)]| match b.route("h", "POST", "/v1/envelopes")
        {
            Routed::Operation(op) => op.quote(&headers(h)).expect("priced"),
            other => panic!("{other:?}"),
        };
        let aadhaar = [("x-signature-method", "aadhaar"), ("x-signers", "3")];
        let (a, b) = (quote(&cheap, &aadhaar), quote(&dear, &aadhaar));
        assert_eq!((a.amount, b.amount), (1 + 15 * 3, 1 + 5 + 20 * 3));
        assert_eq!(a.inputs, b.inputs);
        assert_eq!(a.inputs, "x-signature-method=7:aadhaar;x-signers=1:3;");
        let spelled = [("x-signature-method", " AADHAAR"), ("x-signers", "03")];
        assert_eq!(quote(&cheap, &spelled).inputs, a.inputs);
        // Other units, another variant, no variant: other requests.
        let four = [("x-signature-method", "aadhaar"), ("x-signers", "4")];
        let dsc = [("x-signature-method", "dsc"), ("x-signers", "3")];
        let plain = [("x-signers", "3")];
        for other in [&four[..], &dsc, &plain] {
            assert_ne!(quote(&cheap, other).inputs, a.inputs, "{other:?}");
        }
        // Units the request did not declare are not its inputs, whatever the default.
        assert_eq!(
            quote(&cheap, &[("x-signature-method", "aadhaar")]).inputs,
            "x-signature-method=7:aadhaar;"
        );
        assert_eq!(quote(&cheap, &[]).inputs, "");
    }

    #[test]
    fn the_esign_table_is_expressible() {
        let b = book(ESIGN);
        assert_eq!(price(&b, "POST", "/v1/envelopes", &[]), 1);
        let electronic = [("x-signature-method", "electronic")];
        assert_eq!(price(&b, "POST", "/v1/envelopes", &electronic), 11);
        assert_eq!(
            price(
                &b,
                "POST",
                "/v1/envelopes",
                &[("x-signature-method", "DSC")]
            ),
            11
        );
        let aadhaar = [("x-signature-method", "aadhaar"), ("x-signers", "3")];
        assert_eq!(price(&b, "POST", "/v1/envelopes", &aadhaar), 1 + 15 * 3);
        let one = [("x-signature-method", "aadhaar")];
        assert_eq!(price(&b, "POST", "/v1/envelopes", &one), 16);
        let Routed::Operation(ocr) = b.route("h", "POST", "/v1/documents/d-17/ocr?lang=en") else {
            panic!("ocr route");
        };
        assert_eq!(ocr.name, "ocr.pages");
        assert_eq!(ocr.price(&headers(&[])).unwrap(), 50);
        let hold = ocr.hold().expect("hold mode");
        assert_eq!(hold.ttl_ms, 60_000);
        assert_eq!(
            hold.settle(200, Some("3"), Some(50)),
            Settlement::Capture(Some(6))
        );
        assert_eq!(
            hold.settle(200, Some("400"), Some(50)),
            Settlement::Capture(Some(50))
        );
        assert_eq!(hold.settle(204, None, Some(50)), Settlement::Capture(None));
        // Without the held amount (metadata of another version) still a valid amount.
        let dear = HoldPolicy {
            capture_per_unit: 100_000_000,
            ..HoldPolicy::fallback()
        };
        assert_eq!(
            dear.settle(200, Some("1000000000"), None),
            Settlement::Capture(Some(CREDITS_MAX))
        );
        assert_eq!(hold.settle(502, Some("3"), Some(50)), Settlement::Release);
        assert_eq!(hold.settle(404, None, Some(50)), Settlement::Release);
    }

    /// A hold's settlement terms travel in Envoy's dynamic metadata as text and settle as
    /// the policy they came from; text no price book could have made is not taken.
    #[test]
    fn capture_terms_read_back_as_the_policy_that_wrote_them() {
        let policy = HoldPolicy {
            ttl_ms: 60_000,
            on_expiry: OnExpiry::Capture,
            capture_per_unit: 7,
            capture_units_header: "x-pages.v2".into(),
            capture_statuses: vec![
                StatusRange::parse("2xx").expect("2xx"),
                StatusRange::parse("404").expect("404"),
            ],
        };
        let terms = policy.capture_terms();
        assert_eq!(terms, "7;200-299,404-404;x-pages.v2");
        let back = HoldPolicy::from_capture_terms(&terms).expect("terms");
        assert_eq!(back.capture_per_unit, 7);
        assert_eq!(back.capture_units_header, "x-pages.v2");
        assert_eq!(back.capture_statuses, policy.capture_statuses);
        for (status, units) in [(200, Some("3")), (404, None), (500, Some("3"))] {
            assert_eq!(
                back.settle(status, units, Some(50)),
                policy.settle(status, units, Some(50))
            );
        }
        for bad in [
            "",
            "7",
            "7;200-299",
            "0;200-299;x-units",
            "-1;200-299;x-units",
            "9007199254740992;200-299;x-units",
            "7;;x-units",
            "7;200;x-units",
            "7;299-200;x-units",
            "7;600-600;x-units",
            "7;200-299;",
            "7;200-299;X-Units",
            "7;200-299;x units",
        ] {
            assert_eq!(HoldPolicy::from_capture_terms(bad), None, "{bad:?}");
        }
    }

    /// One normal form for every reading of a path, or a refusal naming why; a path already
    /// normal is not copied.
    #[test]
    fn request_paths_are_matched_in_one_normal_form() {
        for (path, normal) in [
            ("/v1/envelopes", "/v1/envelopes"),
            ("/v1/envelopes/", "/v1/envelopes/"),
            ("/v1/envelopes?next=/../x//y", "/v1/envelopes"),
            ("/v1/%65nvelopes", "/v1/envelopes"),
            ("/v1/a%2Db%5Fc%7Ed%2e", "/v1/a-b_c~d."),
            ("/v1/caf%c3%a9", "/v1/caf%C3%A9"),
            ("/v1/caf\u{e9}", "/v1/caf%C3%A9"),
            ("/v1/reports%3aexport", "/v1/reports:export"),
            ("/v1/%40me%2B1%3Dv", "/v1/@me+1=v"),
            ("/v1/a%3fb%23c%25d", "/v1/a%3Fb%23c%25d"),
            ("/v1/..a", "/v1/..a"),
            ("/v1/a%20b", "/v1/a%20b"),
            ("/v1/...", "/v1/..."),
            ("/v1/.well-known", "/v1/.well-known"),
            ("/", "/"),
            ("", ""),
        ] {
            assert_eq!(normal_path(path, false).as_deref(), Ok(normal), "{path}");
        }
        assert!(matches!(
            normal_path("/v1/envelopes", false),
            Ok(Cow::Borrowed(_))
        ));
        for (path, why) in [
            ("/public/../v1/envelopes", "dot segment"),
            ("/v1/./envelopes", "dot segment"),
            ("/v1/envelopes/..", "dot segment"),
            ("/v1/%2e%2E/envelopes", "dot segment"),
            ("/v1/.%2e", "dot segment"),
            ("/public/..;/v1/envelopes", "; "),
            ("/v1/envelopes;x=1", "; "),
            ("/v1/..%3B/envelopes", "; "),
            ("/v1/free#/../../v1/envelopes", "#"),
            ("/v1//envelopes", "empty segment"),
            ("//v1/envelopes", "empty segment"),
            ("/v1/a%2Fb", "encoded slash"),
            ("/v1/a%2fb", "encoded slash"),
            ("/v1/a%5Cb", "encoded slash"),
            ("/v1\\envelopes", "backslash"),
            ("/v1/%zz", "malformed"),
            ("/v1/%4", "malformed"),
            ("/v1/%", "malformed"),
        ] {
            let err = normal_path(path, false).expect_err(path);
            assert!(err.0.contains(why), "{path}: {err:?}");
        }
        // With encoded slashes allowed they are kept (upper-cased), never decoded.
        assert_eq!(
            normal_path("/v1/documents/a%2fb%5c/ocr", true).as_deref(),
            Ok("/v1/documents/a%2Fb%5C/ocr")
        );
        assert!(normal_path("/v1/%2e%2e/x", true).is_err());
    }

    /// How a lenient upstream reads a path: everything percent-decoded, `\\` taken for
    /// `/`, `;` parameters stripped, `.` and empty segments dropped, `..` resolved. The
    /// segments it serves.
    fn lenient_reading(path: &str) -> Vec<Vec<u8>> {
        let path = path.split(['?', '#']).next().unwrap_or(path);
        let mut segments: Vec<Vec<u8>> = Vec::new();
        for segment in percent_decoded(path.as_bytes()).split(|b| *b == b'/' || *b == b'\\') {
            let name = segment.split(|b| *b == b';').next().unwrap_or(segment);
            match name {
                b"" | b"." => {}
                b".." => {
                    segments.pop();
                }
                _ => segments.push(name.to_vec()),
            }
        }
        segments
    }

    fn percent_decoded(bytes: &[u8]) -> Vec<u8> {
        let hex = |b: u8| char::from(b).to_digit(16);
        let mut out = Vec::new();
        let mut i = 0;
        while i < bytes.len() {
            match (
                bytes[i],
                bytes.get(i + 1).copied().and_then(hex),
                bytes.get(i + 2).copied().and_then(hex),
            ) {
                (b'%', Some(hi), Some(lo)) => {
                    out.push((hi * 16 + lo) as u8);
                    i += 3;
                }
                (b, _, _) => {
                    out.push(b);
                    i += 1;
                }
            }
        }
        out
    }

    proptest::proptest! {
        #![proptest_config(proptest::test_runner::Config::with_cases(2_000))]
        /// No split view: a path tollgate accepts is routed on the very segments a lenient
        /// upstream serves, in a form that is its own normal form (idempotent), plain
        /// ASCII, with only upper-case escapes of what must stay encoded.
        #[test]
        fn an_accepted_path_is_routed_as_a_lenient_upstream_reads_it(
            pieces in proptest::collection::vec(
                proptest::prop_oneof![
                    // What a path is mostly made of…
                    6 => proptest::sample::select(vec![
                        "/", "/", "/", "v1", "a", "B", "%41", "%7e", "~", "%3a", ":", "%25",
                        "%3F", "%23", "\u{e9}", "%c3%a9", "%20", "-", "_", "%2D", "?q=/../x",
                        "...", ".a", "%2e%2E%2e",
                    ]),
                    // …and what makes it ambiguous or malformed.
                    1 => proptest::sample::select(vec![
                        ".", "..", "%2e", "%2E", "%2F", "%2f", "%5C", "\\", ";", "%3B",
                        ";x=1", "#", "?", "%", "%4", "%zz",
                    ]),
                ],
                0..12,
            ),
            lenient_slashes in proptest::bool::ANY,
        ) {
            let path: String = pieces.concat();
            let Ok(normal) = normal_path(&path, lenient_slashes) else {
                return Ok(());
            };
            proptest::prop_assert!(normal.is_ascii(), "{path:?} -> {normal:?}");
            let again = normal_path(&normal, lenient_slashes);
            proptest::prop_assert_eq!(
                again.as_deref(),
                Ok(normal.as_ref()),
                "not idempotent: {:?}",
                path
            );
            let bytes = normal.as_bytes();
            for (i, b) in bytes.iter().enumerate() {
                proptest::prop_assert!(!matches!(b, b'\\' | b'#' | b';' | b'?'), "{path:?} -> {normal:?}");
                if *b == b'%' {
                    let escape = &normal[i + 1..i + 3];
                    let byte = u8::from_str_radix(escape, 16).expect("two hex digits");
                    proptest::prop_assert!(escape == escape.to_ascii_uppercase(), "{normal:?}");
                    proptest::prop_assert!(
                        !byte.is_ascii_alphanumeric() && !b"-._~:@!$&'()*+,=".contains(&byte),
                        "{normal:?} keeps an escape of {:?}", char::from(byte)
                    );
                }
            }
            if !lenient_slashes {
                // The segments routes match, less the empty ones before a leading and
                // after a trailing `/` (a trailing `/` is the price book's to tell apart).
                let inner = normal.strip_prefix('/').unwrap_or(&normal);
                let inner = inner.strip_suffix('/').unwrap_or(inner);
                let routed: Vec<Vec<u8>> = if inner.is_empty() {
                    Vec::new()
                } else {
                    inner.split('/').map(|s| percent_decoded(s.as_bytes())).collect()
                };
                proptest::prop_assert_eq!(routed, lenient_reading(&path), "{:?} -> {:?}", path, normal);
            }
        }
    }

    /// A route is written in the normal form a request path is matched in.
    #[test]
    fn a_route_path_not_in_normal_form_is_refused_with_its_normal_form() {
        let route = |field: &str, path: &str| {
            format!("[pricebook]\n[[pricebook.routes]]\n{field} = {path:?}\noperation = \"free\"\n")
        };
        for (field, path, said) in [
            ("path", "/v1/%65nvelopes", "write it as \"/v1/envelopes\""),
            ("path", "/v1/../envelopes", "dot segment"),
            ("path_prefix", "/v1//", "empty segment"),
            ("path_prefix", "/v1/%7e", "write it as \"/v1/~\""),
            ("path", "/v1/caf\u{e9}", "write it as \"/v1/caf%C3%A9\""),
        ] {
            let err = PriceBook::from_config_text(&route(field, path)).expect_err(path);
            let text = err.to_string();
            assert!(
                text.contains(&format!("pricebook.routes[0].{field}")) && text.contains(said),
                "{path}: {text}"
            );
        }
        let b = book(&route("path_prefix", "/v1/a%2Fb/"));
        assert_eq!(b.route("h", "GET", "/v1/a%2Fb/c"), Routed::Free);
    }

    #[test]
    fn bad_headers_name_the_header() {
        let b = book(ESIGN);
        let Routed::Operation(op) = b.route("h", "POST", "/v1/envelopes") else {
            panic!()
        };
        for (h, header) in [
            (vec![("x-signature-method", "fax")], "x-signature-method"),
            (
                vec![("x-signature-method", "aadhaar"), ("x-signers", "three")],
                "x-signers",
            ),
            (
                vec![
                    ("x-signature-method", "aadhaar"),
                    ("x-signers", "99999999999999999999"),
                ],
                "x-signers",
            ),
            (
                vec![("x-signature-method", "aadhaar"), ("x-signers", "-1")],
                "x-signers",
            ),
        ] {
            let err = op.price(&headers(&h)).unwrap_err();
            assert_eq!(err.header, header, "{h:?}: {err:?}");
        }
    }

    #[test]
    fn routes_match_in_order_with_params_prefixes_and_grpc() {
        let b = book(
            r#"
            [pricebook]
            default = "free"
            [[pricebook.routes]]
            path = "/health"
            operation = "deny"
            [[pricebook.routes]]
            host = "a.example.com"
            path_prefix = "/v1/"
            operation = "a"
            [[pricebook.routes]]
            method = "get"
            path = "/v1/items/{id}"
            operation = "b"
            [[pricebook.routes]]
            grpc_method = "shop.v1.Orders/Place"
            operation = "b"
            [pricebook.operations.a]
            base = 1
            [pricebook.operations.b]
            base = 2
            "#,
        );
        let name =
            |host: &str, method: &str, path: &str| b.route(host, method, path).name().to_owned();
        assert_eq!(name("x", "GET", "/health"), "deny");
        assert_eq!(name("A.example.com:8443", "GET", "/v1/items/7"), "a");
        assert_eq!(name("b.example.com", "GET", "/v1/items/7"), "b");
        assert_eq!(name("b.example.com", "POST", "/v1/items/7"), "free");
        assert_eq!(name("b", "GET", "/v1/items/"), "free");
        // One trailing slash is no part of an exact path or a pattern.
        assert_eq!(name("b.example.com", "GET", "/v1/items/7/"), "b");
        assert_eq!(name("x", "GET", "/health/"), "deny");
        assert_eq!(name("b", "GET", "/v1/items/7/x"), "free");
        assert_eq!(name("b", "POST", "/shop.v1.Orders/Place"), "b");
        assert_eq!(name("b", "GET", "/shop.v1.Orders/Place"), "free");
        // HEAD runs the GET handler on most servers: a GET route prices it.
        assert_eq!(name("b.example.com", "HEAD", "/v1/items/7"), "b");
        assert_eq!(name("b.example.com", "head", "/v1/items/7"), "b");
        assert_eq!(name("b.example.com", "OPTIONS", "/v1/items/7"), "free");
    }

    /// One trailing slash is no part of a route that charges or denies (written with one
    /// or not), and a prefix ending in one also matches the path without it; a free route
    /// and a gRPC method match as written.
    #[test]
    fn one_trailing_slash_is_no_part_of_a_charged_or_denied_route() {
        let b = book(
            r#"
            [pricebook]
            default = "free"
            [[pricebook.routes]]
            method = "GET"
            path = "/v1/envelopes"
            operation = "free"
            [[pricebook.routes]]
            method = "GET"
            path_prefix = "/v1/envelopes/"
            operation = "read"
            [[pricebook.routes]]
            path = "/v1/items/{id}/"
            operation = "read"
            [[pricebook.routes]]
            path = "/v1/closed"
            operation = "deny"
            [[pricebook.routes]]
            path_prefix = "/v1/reports/"
            operation = "read"
            [[pricebook.routes]]
            grpc_method = "shop.v1.Orders/Place"
            operation = "read"
            [pricebook.operations.read]
            base = 1
            "#,
        );
        let name = |method: &str, path: &str| b.route("h", method, path).name().to_owned();
        for (method, path, routed) in [
            // The free exact route does not widen: the slash goes on to the charged prefix.
            ("GET", "/v1/envelopes", "free"),
            ("GET", "/v1/envelopes/", "read"),
            ("GET", "/v1/envelopes/7", "read"),
            ("GET", "/v1/items/7", "read"),
            ("GET", "/v1/items/7/", "read"),
            ("GET", "/v1/items/", "free"),
            ("GET", "/v1/closed", "deny"),
            ("GET", "/v1/closed/", "deny"),
            ("GET", "/v1/reports", "read"),
            ("GET", "/v1/reports/", "read"),
            ("GET", "/v1/reports/x", "read"),
            ("GET", "/v1/reportsx", "free"),
            ("POST", "/shop.v1.Orders/Place", "read"),
            ("POST", "/shop.v1.Orders/Place/", "free"),
            ("GET", "/", "free"),
        ] {
            assert_eq!(name(method, path), routed, "{method} {path}");
        }
    }

    /// A route that charges or denies matches literal segments whatever their ASCII case
    /// (Express and ASP.NET Core route so): under a free default `POST /V1/Envelopes` was
    /// free, and `/d1/OCR` went to a cheaper prefix. A free route matches as written.
    #[test]
    fn a_capital_is_no_way_around_a_charged_or_denied_route() {
        let b = book(
            r#"
            [pricebook]
            default = "free"
            [[pricebook.routes]]
            method = "POST"
            path = "/v1/envelopes"
            operation = "send"
            [[pricebook.routes]]
            method = "POST"
            path = "/v1/documents/{id}/ocr"
            operation = "ocr"
            [[pricebook.routes]]
            path_prefix = "/v1/documents/"
            operation = "read"
            [[pricebook.routes]]
            path = "/v1/Admin"
            operation = "deny"
            [[pricebook.routes]]
            method = "GET"
            path_prefix = "/v1/public/"
            operation = "free"
            [[pricebook.routes]]
            grpc_method = "grpc.health.v1.Health/Check"
            operation = "free"
            [[pricebook.routes]]
            grpc_method = "shop.v1.Orders/Place"
            operation = "send"
            [[pricebook.routes]]
            path_prefix = "/"
            operation = "read"
            [pricebook.operations.send]
            base = 10
            [pricebook.operations.ocr]
            mode = "hold"
            base = 50
            hold_ttl_ms = 60000
            [pricebook.operations.read]
            base = 1
            "#,
        );
        let name = |method: &str, path: &str| b.route("h", method, path).name().to_owned();
        for (method, path, routed) in [
            ("POST", "/v1/envelopes", "send"),
            ("POST", "/V1/Envelopes", "send"),
            ("POST", "/v1/ENVELOPES/", "send"),
            ("POST", "/v1/documents/d1/ocr", "ocr"),
            ("POST", "/v1/documents/d1/OCR", "ocr"),
            ("POST", "/v1/Documents/D1/Ocr?x=Y", "ocr"),
            ("GET", "/v1/DOCUMENTS/d1", "read"),
            ("GET", "/v1/admin", "deny"),
            ("GET", "/V1/ADMIN/", "deny"),
            ("POST", "/shop.v1.orders/place", "send"),
            // Free routes as written: another spelling goes on to what follows.
            ("GET", "/v1/public/x", "free"),
            ("GET", "/v1/Public/x", "read"),
            ("POST", "/grpc.health.v1.Health/Check", "free"),
            ("POST", "/grpc.health.v1.health/check", "read"),
        ] {
            assert_eq!(name(method, path), routed, "{method} {path}");
        }
    }

    /// Two routes whose paths differ only in case are refused, the later one's path field
    /// named: whatever the upstream, one of them is misread.
    #[test]
    fn routes_that_differ_only_in_case_are_refused() {
        let refused = |earlier: &str, later: &str| {
            let text = format!(
                "[pricebook]\n[[pricebook.routes]]\n{earlier}\n[[pricebook.routes]]\n{later}\n\
                 [pricebook.operations.read]\nbase = 1\n"
            );
            PriceBook::from_config_text(&text).err().map(|e| {
                e.0.iter()
                    .map(|e| format!("{}: {}", e.path, e.message))
                    .collect::<Vec<_>>()
            })
        };
        for (earlier, later, field) in [
            (
                "path = \"/v1/envelopes\"\noperation = \"read\"",
                "method = \"GET\"\npath = \"/v1/Envelopes\"\noperation = \"free\"",
                "path",
            ),
            (
                "path = \"/v1/Docs/{id}\"\noperation = \"free\"",
                "path = \"/v1/docs/{ID}\"\noperation = \"read\"",
                "path",
            ),
            (
                "path_prefix = \"/V1/\"\noperation = \"read\"",
                "path_prefix = \"/v1/\"\noperation = \"read\"",
                "path_prefix",
            ),
            (
                "path = \"/a.B/C\"\noperation = \"read\"",
                "grpc_method = \"a.b/c\"\noperation = \"read\"",
                "grpc_method",
            ),
        ] {
            let errors = refused(earlier, later).unwrap_or_default();
            assert_eq!(errors.len(), 1, "{earlier} / {later}: {errors:?}");
            assert!(
                errors[0].starts_with(&format!("pricebook.routes[1].{field}: "))
                    && errors[0].contains("differs from pricebook.routes[0].")
                    && errors[0].contains("only in letter case"),
                "{errors:?}"
            );
        }
        // The same path, or another host: not the case's doing.
        for (earlier, later) in [
            (
                "method = \"GET\"\npath = \"/v1/Docs\"\noperation = \"free\"",
                "method = \"POST\"\npath = \"/v1/Docs\"\noperation = \"read\"",
            ),
            (
                "host = \"a.com\"\npath = \"/v1/Docs\"\noperation = \"read\"",
                "host = \"b.com\"\npath = \"/v1/docs\"\noperation = \"read\"",
            ),
        ] {
            assert_eq!(refused(earlier, later), None, "{earlier} / {later}");
        }
    }

    /// A HEAD route before the GET route prices HEAD apart; after it, it never matches.
    #[test]
    fn a_head_route_before_the_get_route_prices_head_apart() {
        let b = book(
            r#"
            [pricebook]
            default = "deny"
            [[pricebook.routes]]
            method = "HEAD"
            path = "/v1/reports"
            operation = "free"
            [[pricebook.routes]]
            method = "GET"
            path_prefix = "/v1/"
            operation = "read"
            [pricebook.operations.read]
            base = 3
            "#,
        );
        assert_eq!(b.route("h", "HEAD", "/v1/reports"), Routed::Free);
        assert!(
            matches!(b.route("h", "HEAD", "/v1/other"), Routed::Operation(op) if op.name == "read")
        );
        assert!(
            matches!(b.route("h", "GET", "/v1/reports"), Routed::Operation(op) if op.name == "read")
        );
        assert_eq!(b.route("h", "POST", "/v1/reports"), Routed::Deny);
    }

    #[test]
    fn every_error_is_reported_with_its_path() {
        let err = PriceBook::from_config_text(
            r#"
            [pricebook]
            default = "nothing"
            colour = 1
            [[pricebook.routes]]
            path = "v1/no-slash"
            operation = "missing.op"
            [[pricebook.routes]]
            path = "/a"
            path_prefix = "/b"
            operation = "free"
            [[pricebook.routes]]
            method = "POST"
            grpc_method = "NoMethod"
            operation = "free"
            [[pricebook.routes]]
            path = "/x"
            operations = "typo"
            [pricebook.operations."envelope.send"]
            base = -1
            mode = "later"
            per_unit = "many"
            variant_header = "x-signature-method"
            [pricebook.operations."envelope.send".variants]
            Aadhaar = { flat = 1, colour = 2 }
            [pricebook.operations.ocr]
            mode = "hold"
            capture_statuses = ["2xx", "teapot"]
            [pricebook.operations.plain]
            hold_ttl_ms = 5
            fail_policy = "maybe"
            wallet = "Main"
            "#,
        )
        .unwrap_err()
        .0;
        let paths: Vec<&str> = errors_paths(&err);
        for expected in [
            "pricebook.default",
            "pricebook.colour",
            "pricebook.routes[0].path",
            "pricebook.routes[0].operation",
            "pricebook.routes[1]",
            "pricebook.routes[2].grpc_method",
            "pricebook.routes[3].operations",
            "pricebook.routes[3].operation",
            "pricebook.operations.\"envelope.send\".base",
            "pricebook.operations.\"envelope.send\".mode",
            "pricebook.operations.\"envelope.send\".per_unit",
            "pricebook.operations.\"envelope.send\".variants.Aadhaar",
            "pricebook.operations.\"envelope.send\".variants.Aadhaar.colour",
            "pricebook.operations.ocr.hold_ttl_ms",
            "pricebook.operations.ocr.capture_statuses[1]",
            "pricebook.operations.plain.hold_ttl_ms",
            "pricebook.operations.plain.fail_policy",
            "pricebook.operations.plain.wallet",
        ] {
            assert!(
                paths.contains(&expected),
                "{expected} missing from {err:#?}"
            );
        }
    }

    fn errors_paths(errors: &[ConfigError]) -> Vec<&str> {
        errors.iter().map(|e| e.path.as_str()).collect()
    }

    #[test]
    fn status_ranges() {
        let r = StatusRange::parse("2xx").unwrap();
        assert!(r.contains(200) && r.contains(299) && !r.contains(300));
        assert_eq!(
            StatusRange::parse("404"),
            Some(StatusRange {
                first: 404,
                last: 404
            })
        );
        assert_eq!(StatusRange::parse("9xx"), None);
        assert_eq!(StatusRange::parse("99"), None);
    }

    #[test]
    fn ports_are_ignored_in_hosts() {
        assert_eq!(strip_port("a.example.com:443"), "a.example.com");
        assert_eq!(strip_port("a.example.com"), "a.example.com");
        assert_eq!(strip_port("[::1]:80"), "[::1]");
    }

    #[test]
    fn a_route_host_is_written_as_requests_are_matched() {
        let book = |host: &str| {
            PriceBook::from_config_text(&format!(
                r#"
                [pricebook]
                default = "deny"
                [[pricebook.routes]]
                host = "{host}"
                path_prefix = "/"
                operation = "call"
                [pricebook.operations.call]
                base = 2
                "#
            ))
        };
        // A port would never match (requests' ports are ignored): refused, naming it.
        let errors = book("api.example.com:8443").expect_err("a host with a port");
        assert!(
            errors
                .0
                .iter()
                .any(|e| e.path == "pricebook.routes[0].host"),
            "{errors:?}"
        );
        // A final dot is the same host, in the book and in the request.
        let b = book("API.example.com.").unwrap_or_else(|e| panic!("{e}"));
        for host in [
            "api.example.com",
            "api.example.com.",
            "api.example.com.:443",
        ] {
            assert!(
                matches!(b.route(host, "GET", "/x"), Routed::Operation(_)),
                "{host}"
            );
        }
        assert!(matches!(
            b.route("other.example.com", "GET", "/x"),
            Routed::Deny
        ));
    }

    /// What [`PriceBook::first_route`] did before the index: every route tried in order.
    fn first_route_by_scan(
        book: &PriceBook,
        host: &str,
        method: &str,
        path: &str,
    ) -> Option<usize> {
        book.routes.iter().position(|r| {
            r.matches_method(method)
                && r.host
                    .as_deref()
                    .is_none_or(|h| h.eq_ignore_ascii_case(host))
                && r.matches_path(path)
        })
    }

    /// A book of `routes` as given, indexed in order (no shadowing refused).
    fn indexed(routes: Vec<Route>) -> PriceBook {
        let mut index = RouteIndex::default();
        for (i, route) in routes.iter().enumerate() {
            index.insert(i, route);
        }
        PriceBook {
            routes,
            index,
            ..PriceBook::default()
        }
    }

    /// A route as written, and whether it folds case (charges or denies).
    fn route_strategy() -> impl proptest::strategy::Strategy<Value = (Route, bool)> {
        use proptest::prelude::*;
        let segment = prop::sample::select(vec!["v1", "a", "ab", "", "{id}", "V1", "A", "aB"]);
        (
            prop::sample::select(vec![None, Some("GET"), Some("HEAD"), Some("POST")]),
            prop::sample::select(vec![None, Some("a.com"), Some("b.com")]),
            0..3u8,
            prop::collection::vec(segment, 0..4),
            prop::sample::select(vec!["", "a", "v", "ab", "A"]),
            (any::<bool>(), any::<bool>()),
        )
            .prop_map(
                |(method, host, kind, segments, partial, (fold_slash, fold_case))| {
                    let literal = |s: &&'static str| -> &'static str {
                        if *s == "{id}" {
                            "x"
                        } else {
                            s
                        }
                    };
                    let path = match kind {
                        0 => PathPattern::Exact(format!(
                            "/{}",
                            segments.iter().map(literal).collect::<Vec<_>>().join("/")
                        )),
                        // As the config makes them: with a parameter.
                        1 if segments.contains(&"{id}") => PathPattern::Segments(
                            std::iter::once(Some(String::new()))
                                .chain(
                                    segments
                                        .iter()
                                        .map(|s| (*s != "{id}").then(|| (*s).to_owned())),
                                )
                                .collect(),
                        ),
                        _ => {
                            let mut p: String = segments
                                .iter()
                                .map(|s| format!("/{}", literal(s)))
                                .collect();
                            p.push('/');
                            p.push_str(partial);
                            PathPattern::Prefix(p)
                        }
                    };
                    let route = Route {
                        method: method.map(str::to_owned),
                        host: host.map(str::to_owned),
                        written_upper: path.has_ascii_uppercase(),
                        path,
                        target: Target::Deny,
                        fold_slash,
                        fold_case: false,
                    };
                    (route, fold_case)
                },
            )
    }

    /// The routes as the config makes them of the written ones.
    fn configured(written: &[(Route, bool)]) -> Vec<Route> {
        written
            .iter()
            .map(|(route, fold_case)| {
                if *fold_case {
                    route.clone().folding_case()
                } else {
                    route.clone()
                }
            })
            .collect()
    }

    proptest::proptest! {
        #![proptest_config(proptest::test_runner::Config::with_cases(3_000))]
        /// The index finds the route a scan of every route in order finds: the first match.
        #[test]
        fn the_index_routes_as_a_scan_of_every_route_in_order(
            routes in proptest::collection::vec(route_strategy(), 0..12),
            host in proptest::sample::select(vec!["a.com", "A.com", "b.com", "c.com", ""]),
            method in proptest::sample::select(vec!["GET", "HEAD", "POST", "get", "PUT"]),
            pieces in proptest::collection::vec(
                proptest::sample::select(
                    vec!["/", "/", "v1", "a", "ab", "abc", "x", "v", "V1", "A", "Ab", "aB"],
                ),
                0..9,
            ),
        ) {
            let book = indexed(configured(&routes));
            let path: String = pieces.concat();
            proptest::prop_assert_eq!(
                book.first_route(host, method, &path).0,
                first_route_by_scan(&book, host, method, &path),
                "{} {} {:?} in {:#?}", method, host, path, book.routes
            );
        }

        /// A route refused as shadowed never matches a request (that reaches routing)
        /// spelled as the route is written that an earlier route does not match too.
        #[test]
        fn a_shadowed_route_matches_nothing_the_earlier_one_does_not(
            routes in proptest::collection::vec(route_strategy(), 2..8),
            requests in proptest::collection::vec(
                (
                    proptest::sample::select(vec!["a.com", "b.com", ""]),
                    proptest::sample::select(vec!["GET", "HEAD", "POST", "PUT"]),
                    proptest::collection::vec(
                        proptest::sample::select(
                            vec!["/", "/", "v1", "a", "ab", "abc", "x", "v", "V1", "A", "aB"],
                        ),
                        0..9,
                    ),
                ),
                50,
            ),
        ) {
            let book = indexed(configured(&routes));
            let mut earlier = RouteIndex::default();
            for (i, route) in book.routes.iter().enumerate() {
                let written = &routes[i].0;
                if let Some(by) = shadowing(&earlier, &book.routes, route, &written.witnesses()) {
                    for (host, method, pieces) in &requests {
                        let path: String = pieces.concat();
                        // Only what reaches routing (`//` does not).
                        if normal_path(&path, false).is_err() {
                            continue;
                        }
                        let matches = |r: &Route| r.matches_method(method)
                            && r.host.as_deref().is_none_or(|h| h == *host)
                            && r.matches_path(&path);
                        let as_written = written.path.matches(&path, written.fold_slash);
                        proptest::prop_assert!(
                            by < i
                                && (!(matches(route) && as_written)
                                    || matches(&book.routes[by])),
                            "{:?} shadowed by {:?}, yet {} {} {:?}",
                            route, book.routes[by], method, host, path
                        );
                    }
                }
                earlier.insert(i, route);
            }
        }
    }

    /// Routing costs a walk down the request's path, not a scan of the book: 5,000
    /// operations, each with its route, and a request for the last one (or for none)
    /// visits a handful of index nodes.
    #[test]
    fn routing_visits_a_few_nodes_whatever_the_number_of_routes() {
        let operations = 5_000;
        let mut text = String::from("[pricebook]\ndefault = \"deny\"\n");
        for i in 0..operations {
            text.push_str(&format!(
                "[[pricebook.routes]]\nmethod = \"POST\"\npath = \"/v1/things{i}/{{id}}/run\"\noperation = \"op{i}\"\n"
            ));
        }
        text.push_str("[[pricebook.routes]]\npath_prefix = \"/v2/\"\noperation = \"op0\"\n");
        for i in 0..operations {
            text.push_str(&format!("[pricebook.operations.op{i}]\nbase = {}\n", i + 1));
        }
        let b = book(&text);
        assert_eq!(b.routes_len(), operations + 1);
        for (method, path, routed) in [
            ("POST", "/v1/things4999/7/run", "op4999"),
            ("POST", "/v1/things0/7/run", "op0"),
            ("POST", "/v1/things4999/7/walk", "deny"),
            ("GET", "/v1/things4999/7/run", "deny"),
            ("GET", "/v2/anything/at/all", "op0"),
            ("GET", "/nothing", "deny"),
        ] {
            let (got, visited) = b.route_visiting("api.example.com", method, path);
            assert_eq!(got.name(), routed, "{method} {path}");
            assert!(visited <= 6, "{method} {path}: {visited} nodes visited");
        }
    }

    /// A route that an earlier one matches every request of never matches: refused,
    /// naming both, whatever it charges (a duplicate, a catch-all before it, the same
    /// path with a trailing slash, a HEAD route after its GET route).
    #[test]
    fn a_route_an_earlier_route_shadows_is_refused() {
        let refused = |routes: &str| {
            let text = format!(
                "[pricebook]\n{routes}\n[pricebook.operations.read]\nbase = 1\n[pricebook.operations.write]\nbase = 2\n"
            );
            match PriceBook::from_config_text(&text) {
                Ok(_) => None,
                Err(e) => Some(
                    e.0.iter()
                        .map(|e| format!("{}: {}", e.path, e.message))
                        .collect::<Vec<_>>(),
                ),
            }
        };
        let route = |fields: &str| format!("[[pricebook.routes]]\n{fields}\n");
        for (earlier, later) in [
            (
                "path = \"/v1/docs\"\noperation = \"read\"",
                "path = \"/v1/docs\"\noperation = \"write\"",
            ),
            (
                "path = \"/v1/docs\"\noperation = \"read\"",
                "path = \"/v1/docs/\"\noperation = \"write\"",
            ),
            (
                "path_prefix = \"/v1/\"\noperation = \"free\"",
                "path = \"/v1/docs/{id}\"\noperation = \"write\"",
            ),
            (
                "path_prefix = \"/v1/\"\noperation = \"free\"",
                "path_prefix = \"/v1/docs/\"\noperation = \"write\"",
            ),
            (
                "path_prefix = \"/v1/do\"\noperation = \"read\"",
                "path = \"/v1/docs\"\noperation = \"write\"",
            ),
            (
                "path = \"/v1/docs/{id}\"\noperation = \"read\"",
                "path = \"/v1/docs/7\"\noperation = \"write\"",
            ),
            (
                "path = \"/v1/{a}/{b}\"\noperation = \"read\"",
                "method = \"POST\"\npath = \"/v1/docs/{id}\"\noperation = \"write\"",
            ),
            (
                "method = \"GET\"\npath = \"/v1/docs\"\noperation = \"read\"",
                "method = \"HEAD\"\npath = \"/v1/docs\"\noperation = \"free\"",
            ),
            (
                "path = \"/v1/docs\"\noperation = \"read\"",
                "host = \"api.example.com\"\npath = \"/v1/docs\"\noperation = \"write\"",
            ),
            // The prefix folds its slash: it matches `/v1/docs` and `/v1/docs/`.
            (
                "path_prefix = \"/v1/docs/\"\noperation = \"read\"",
                "path = \"/v1/docs\"\noperation = \"write\"",
            ),
            (
                "host = \"API.example.com\"\npath_prefix = \"/\"\noperation = \"read\"",
                "host = \"api.example.com.\"\ngrpc_method = \"a.B/C\"\noperation = \"write\"",
            ),
            // Case: a charged prefix matches every spelling. A charged route behind a free
            // one matched as written is judged as written: it would charge other spellings
            // only.
            (
                "path_prefix = \"/V1/\"\noperation = \"read\"",
                "path = \"/v1/docs\"\noperation = \"write\"",
            ),
            (
                "path_prefix = \"/v1/\"\noperation = \"free\"",
                "path = \"/v1/Docs\"\noperation = \"write\"",
            ),
        ] {
            let errors = refused(&format!("{}{}", route(earlier), route(later)));
            assert_eq!(
                errors,
                Some(vec!["pricebook.routes[1]: never matches: pricebook.routes[0] (first match wins) matches every request it does".to_owned()]),
                "{earlier} / {later}"
            );
        }
        // Overlapping but each matching requests the other does not: both kept.
        for (earlier, later) in [
            (
                "path = \"/v1/docs/7\"\noperation = \"read\"",
                "path = \"/v1/docs/{id}\"\noperation = \"write\"",
            ),
            (
                "path = \"/v1/docs/{id}\"\noperation = \"read\"",
                "path_prefix = \"/v1/docs/\"\noperation = \"write\"",
            ),
            (
                "path = \"/v1/docs\"\noperation = \"free\"",
                "path = \"/v1/docs/\"\noperation = \"write\"",
            ),
            (
                "path_prefix = \"/v1/docs/\"\noperation = \"free\"",
                "path_prefix = \"/v1/docs\"\noperation = \"write\"",
            ),
            (
                "method = \"HEAD\"\npath = \"/v1/docs\"\noperation = \"free\"",
                "method = \"GET\"\npath = \"/v1/docs\"\noperation = \"read\"",
            ),
            (
                "method = \"POST\"\npath = \"/v1/docs\"\noperation = \"read\"",
                "path = \"/v1/docs\"\noperation = \"write\"",
            ),
            (
                "host = \"a.example.com\"\npath = \"/v1/docs\"\noperation = \"read\"",
                "path = \"/v1/docs\"\noperation = \"write\"",
            ),
            (
                "path = \"/v1/{id}\"\noperation = \"read\"",
                "path = \"/v1/{id}/x\"\noperation = \"write\"",
            ),
            (
                "grpc_method = \"a.B/C\"\noperation = \"read\"",
                "path = \"/a.B/C\"\noperation = \"write\"",
            ),
            // A free route matches as written: the charged one takes what it is written as.
            (
                "path_prefix = \"/V1/\"\noperation = \"free\"",
                "path = \"/v1/docs\"\noperation = \"write\"",
            ),
        ] {
            assert_eq!(
                refused(&format!("{}{}", route(earlier), route(later))),
                None,
                "{earlier} / {later}"
            );
        }
    }

    #[test]
    fn a_route_path_of_too_many_segments_is_refused() {
        let deep = "/a".repeat(ROUTE_SEGMENTS_MAX);
        for field in ["path", "path_prefix"] {
            let err = PriceBook::from_config_text(&format!(
                "[pricebook]\n[[pricebook.routes]]\n{field} = \"{deep}\"\noperation = \"free\"\n"
            ))
            .expect_err(field);
            assert_eq!(err.0[0].path, format!("pricebook.routes[0].{field}"));
        }
        let fits = "/a".repeat(ROUTE_SEGMENTS_MAX - 1);
        book(&format!(
            "[pricebook]\n[[pricebook.routes]]\npath = \"{fits}\"\noperation = \"free\"\n"
        ));
    }
}
