//! The job lifecycle's part of the JSON API: the dead set (list, show, retry, delete),
//! pausing functions and limiting how many of their jobs run at once, retry policies, and the
//! periodic jobs. The dead set and paused functions live in the lifecycle store, reached on a
//! blocking thread through `crate::lifecycle` (never under the broker's lock); limits and
//! retry policies are the broker's, changed for this server until it stops, as the admin
//! `limit` and `retry` commands change them.
//!
//! A request that changes something must say `Content-Type: application/json`, body or not:
//! an HTML form on another site cannot send that type, and a script there cannot either
//! without a CORS preflight, which this server never grants. (`POST /api/jobs` is guarded the
//! same way by its JSON body; `DELETE`, like `PUT`, is never a simple cross-site request.)

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use gearbox_store::lifecycle::DeadFilter;
use serde::{Deserialize, Serialize};

use super::api::{ApiError, ApiResult};
use crate::broker::{lifecycle_defaults, Backoff, RetryPolicy};
use crate::lifecycle::admin::DeadView;
use crate::lifecycle::{self, Retried, ScheduleView, Selection, NOT_DEAD};
use crate::shared::Shared;

/// Dead jobs `GET /api/dead` lists unless told, and at most.
const DEFAULT_LISTED: usize = 100;
const MAX_LISTED: usize = 1000;

pub(super) fn routes() -> Router<super::AppState> {
    Router::new()
        .route("/dead", get(dead_list))
        .route("/dead/retry", post(retry_selected))
        .route("/dead/delete", post(delete_selected))
        .route("/dead/{handle}", get(dead_show).delete(delete_one))
        .route("/dead/{handle}/retry", post(retry_one))
        .route("/functions/{name}/pause", post(pause))
        .route("/functions/{name}/resume", post(resume))
        .route("/functions/{name}/limit", put(limit))
        .route("/retry", get(retry_policies))
        .route("/retry/{function}", put(set_retry).delete(remove_retry))
        .route("/schedules", get(schedules))
}

/// The lifecycle store failed (or is not open).
fn unavailable(e: String) -> ApiError {
    ApiError::new(StatusCode::SERVICE_UNAVAILABLE, e)
}

/// A JSON body, or a 400 saying what is wrong with it (its content type included).
fn body<T>(body: Result<Json<T>, JsonRejection>) -> Result<T, ApiError> {
    body.map(|Json(b)| b).map_err(|e| ApiError::bad_request(e.body_text()))
}

/// Refuses a request without `Content-Type: application/json` (see the module's description),
/// as axum's `Json` refuses one with a body.
fn json_request(headers: &HeaderMap) -> Result<(), ApiError> {
    let content_type = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
    let mime = content_type.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
    if mime == "application/json" || (mime.starts_with("application/") && mime.ends_with("+json")) {
        Ok(())
    } else {
        Err(ApiError::bad_request("Expected request with `Content-Type: application/json`"))
    }
}

fn no_content() -> Response {
    StatusCode::NO_CONTENT.into_response()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DeadQuery {
    function: Option<String>,
    limit: Option<usize>,
    offset: Option<usize>,
}

#[derive(Serialize)]
struct DeadList {
    /// Newest first, without payloads.
    jobs: Vec<DeadView>,
    /// Dead jobs per function, whatever the filter.
    counts: BTreeMap<String, u64>,
}

async fn dead_list(
    State(shared): State<Arc<Shared>>,
    query: Result<Query<DeadQuery>, QueryRejection>,
) -> ApiResult<DeadList> {
    let Query(query) = query.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let limit = query.limit.unwrap_or(DEFAULT_LISTED);
    if !(1..=MAX_LISTED).contains(&limit) {
        return Err(ApiError::bad_request(format!("bad limit {limit}: from 1 to {MAX_LISTED}")));
    }
    let function = query.function.filter(|f| !f.is_empty()).map(String::into_bytes);
    let filter = DeadFilter { function, limit, offset: query.offset.unwrap_or(0) };
    let jobs = lifecycle::dead_list(&shared, filter).await.map_err(unavailable)?;
    let mut counts = BTreeMap::new();
    for (function, n) in lifecycle::dead_counts(&shared).await.map_err(unavailable)? {
        *counts.entry(String::from_utf8_lossy(&function).into_owned()).or_default() += n;
    }
    Ok(Json(DeadList { jobs: jobs.into_iter().map(DeadView::from).collect(), counts }))
}

async fn dead_show(State(shared): State<Arc<Shared>>, Path(handle): Path<String>) -> ApiResult<DeadView> {
    match lifecycle::dead_get(&shared, handle.clone()).await.map_err(unavailable)? {
        Some(job) => Ok(Json(DeadView::from(job))),
        None => Err(ApiError::not_found(format!("no dead job {handle}"))),
    }
}

/// Runs one dead job again: 404 if it is not dead (any more), 503 if the server refused the
/// new job (it stays dead).
async fn retry_one(
    State(shared): State<Arc<Shared>>,
    Path(handle): Path<String>,
    headers: HeaderMap,
) -> ApiResult<Retried> {
    json_request(&headers)?;
    let retried = lifecycle::dead_retry(&shared, Selection::Handles(vec![handle.clone()])).await;
    let retried = retried.map_err(unavailable)?.pop().expect("one handle, one answer");
    match retried.error.as_deref() {
        None => Ok(Json(retried)),
        Some(NOT_DEAD) => Err(ApiError::not_found(format!("no dead job {handle}"))),
        Some(e) => Err(unavailable(format!("{handle} could not be submitted again: {e}"))),
    }
}

async fn delete_one(State(shared): State<Arc<Shared>>, Path(handle): Path<String>) -> Result<Response, ApiError> {
    match lifecycle::dead_delete(&shared, Selection::Handles(vec![handle.clone()])).await.map_err(unavailable)? {
        0 => Err(ApiError::not_found(format!("no dead job {handle}"))),
        _ => Ok(no_content()),
    }
}

/// `{"handles": [...]}`, or `{"all": true}` with an optional `"function"`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SelectionBody {
    #[serde(default)]
    handles: Option<Vec<String>>,
    #[serde(default)]
    all: bool,
    #[serde(default)]
    function: Option<String>,
}

impl TryFrom<SelectionBody> for Selection {
    type Error = ApiError;

    fn try_from(body: SelectionBody) -> Result<Selection, ApiError> {
        match (body.handles, body.all, body.function) {
            (Some(handles), false, None) => Ok(Selection::Handles(handles)),
            (None, true, Some(f)) if f.is_empty() => Err(ApiError::bad_request("the function is empty")),
            (None, true, function) => Ok(Selection::All { function: function.map(String::into_bytes) }),
            _ => Err(ApiError::bad_request(
                r#"select dead jobs with {"handles": [...]} or {"all": true} (and "function": "F" for one function's)"#,
            )),
        }
    }
}

#[derive(Serialize)]
struct RetriedReply {
    retried: Vec<Retried>,
}

/// Runs the selected dead jobs again; each answer says its new handle or why not.
async fn retry_selected(
    State(shared): State<Arc<Shared>>,
    selection: Result<Json<SelectionBody>, JsonRejection>,
) -> ApiResult<RetriedReply> {
    let selection = Selection::try_from(body(selection)?)?;
    let retried = lifecycle::dead_retry(&shared, selection).await.map_err(unavailable)?;
    Ok(Json(RetriedReply { retried }))
}

#[derive(Serialize)]
struct DeletedReply {
    deleted: u64,
}

async fn delete_selected(
    State(shared): State<Arc<Shared>>,
    selection: Result<Json<SelectionBody>, JsonRejection>,
) -> ApiResult<DeletedReply> {
    let selection = Selection::try_from(body(selection)?)?;
    let deleted = lifecycle::dead_delete(&shared, selection).await.map_err(unavailable)?;
    Ok(Json(DeletedReply { deleted }))
}

#[derive(Serialize)]
struct PausedReply {
    function: String,
    paused: bool,
}

async fn set_paused(shared: &Shared, function: String, paused: bool, headers: &HeaderMap) -> ApiResult<PausedReply> {
    json_request(headers)?;
    lifecycle::set_paused(shared, function.clone().into_bytes(), paused).await.map_err(unavailable)?;
    Ok(Json(PausedReply { function, paused }))
}

async fn pause(
    State(shared): State<Arc<Shared>>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> ApiResult<PausedReply> {
    set_paused(&shared, name, true, &headers).await
}

async fn resume(
    State(shared): State<Arc<Shared>>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> ApiResult<PausedReply> {
    set_paused(&shared, name, false, &headers).await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LimitBody {
    /// At most this many of the function's jobs run at once on this server; 0 for no limit.
    limit: u32,
}

#[derive(Serialize)]
struct LimitReply {
    function: String,
    limit: u32,
}

async fn limit(
    State(shared): State<Arc<Shared>>,
    Path(name): Path<String>,
    limit: Result<Json<LimitBody>, JsonRejection>,
) -> ApiResult<LimitReply> {
    let LimitBody { limit } = body(limit)?;
    {
        let mut broker = shared.broker.lock().unwrap();
        // Workers a higher limit lets in are woken from here.
        broker.begin_external();
        broker.set_limit(name.as_bytes(), limit);
    }
    Ok(Json(LimitReply { function: name, limit }))
}

/// A retry policy as JSON shows it.
#[derive(Serialize)]
struct PolicyView {
    retries: u32,
    backoff: Backoff,
    base_ms: u64,
    max_delay_ms: u64,
}

impl From<&RetryPolicy> for PolicyView {
    fn from(p: &RetryPolicy) -> PolicyView {
        PolicyView {
            retries: p.retries,
            backoff: p.backoff,
            base_ms: p.base.as_millis() as u64,
            max_delay_ms: p.max_delay.as_millis() as u64,
        }
    }
}

/// Every policy by function, `*` for the default.
async fn retry_policies(State(shared): State<Arc<Shared>>) -> Json<BTreeMap<String, PolicyView>> {
    let broker = shared.broker.lock().unwrap();
    let policies = broker.retry_policies();
    let named = policies.by_function.iter().map(|(f, p)| (String::from_utf8_lossy(f).into_owned(), p.into()));
    let default = policies.default.iter().map(|p| ("*".to_string(), p.into()));
    Json(named.chain(default).collect())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RetryBody {
    /// Attempts after the first.
    retries: u32,
    #[serde(default)]
    backoff: Option<Backoff>,
    /// Durations as humantime reads them (`2s`, `1h30m`).
    #[serde(default)]
    base: Option<String>,
    #[serde(default)]
    max_delay: Option<String>,
}

impl RetryBody {
    /// The policy, with the config file's defaults for what the body leaves out.
    fn policy(&self) -> Result<RetryPolicy, ApiError> {
        let duration = |what: &str, value: &Option<String>, default: Duration| match value {
            Some(v) => humantime::parse_duration(v).map_err(|e| ApiError::bad_request(format!("{what} {v:?}: {e}"))),
            None => Ok(default),
        };
        let base = duration("base", &self.base, lifecycle_defaults::BASE)?;
        let max_delay = duration("max_delay", &self.max_delay, lifecycle_defaults::MAX_DELAY)?;
        Ok(RetryPolicy {
            retries: self.retries,
            backoff: self.backoff.unwrap_or(Backoff::Exponential),
            base,
            max_delay: max_delay.max(base),
        })
    }
}

#[derive(Serialize)]
struct PolicyReply {
    function: String,
    #[serde(flatten)]
    policy: PolicyView,
}

/// Sets the policy of `function` (`*`: every function without one of its own).
async fn set_retry(
    State(shared): State<Arc<Shared>>,
    Path(function): Path<String>,
    policy: Result<Json<RetryBody>, JsonRejection>,
) -> ApiResult<PolicyReply> {
    let policy = body(policy)?.policy()?;
    shared.broker.lock().unwrap().set_retry_policy(function.as_bytes(), Some(policy));
    Ok(Json(PolicyReply { function, policy: (&policy).into() }))
}

/// Removes the policy of `function` (`*`: the default); 404 if it had none of its own.
async fn remove_retry(State(shared): State<Arc<Shared>>, Path(function): Path<String>) -> Result<Response, ApiError> {
    let mut broker = shared.broker.lock().unwrap();
    let policies = broker.retry_policies();
    let had = match function.as_str() {
        "*" => policies.default.is_some(),
        f => policies.by_function.contains_key(f.as_bytes()),
    };
    if !had {
        return Err(ApiError::not_found(format!("no retry policy for {function:?}")));
    }
    broker.set_retry_policy(function.as_bytes(), None);
    Ok(no_content())
}

async fn schedules(State(shared): State<Arc<Shared>>) -> Json<Vec<ScheduleView>> {
    Json(shared.schedules.views())
}
