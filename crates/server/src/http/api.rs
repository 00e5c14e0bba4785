//! The JSON API under `/api`. Errors are `{"error": "..."}` with a fitting status code.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, RawQuery, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use gearbox_joblog::{Body, Query, Record};
use gearbox_proto::{Priority, Request, Response as Reply};
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::local::LocalConn;
use crate::broker::{CancelError, FunctionView, JobView, Totals, WorkerView};
use crate::shared::Shared;

/// Most jobs `/api/functions/{name}/jobs` lists.
const JOBS_LISTED: usize = 1000;
/// How long a foreground submission waits for its result unless told.
const DEFAULT_WAIT: Duration = Duration::from_secs(30);
const MAX_WAIT: Duration = Duration::from_secs(600);

pub(crate) fn routes() -> Router<super::AppState> {
    Router::new()
        .route("/status", get(status))
        .route("/workers", get(workers))
        .route("/cluster", get(cluster))
        .route("/functions/{name}/jobs", get(function_jobs))
        .route("/log", get(log))
        .route("/jobs", axum::routing::post(submit))
        .route("/jobs/{handle}", get(job).delete(cancel))
        .merge(super::lifecycle::routes())
}

pub(crate) struct ApiError {
    status: StatusCode,
    message: String,
}

impl ApiError {
    pub(super) fn new(status: StatusCode, message: impl Into<String>) -> ApiError {
        ApiError { status, message: message.into() }
    }

    pub fn not_found(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, message)
    }

    pub(super) fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(json!({ "error": self.message }))).into_response()
    }
}

pub(super) type ApiResult<T> = Result<Json<T>, ApiError>;

#[derive(Serialize)]
struct JobLogStatus {
    sink: &'static str,
    written: u64,
    dropped: u64,
    /// The size fields, for a sink that reports them (embedded); left out for MongoDB.
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    size: Option<JobLogSize>,
}

/// In bytes.
#[derive(Serialize)]
struct JobLogSize {
    bytes: u64,
    /// `null` when there is no limit.
    max_bytes: Option<u64>,
    expired_bytes_age: u64,
    expired_bytes_size: u64,
}

#[derive(Serialize)]
struct StatusReply {
    version: String,
    uptime_secs: u64,
    connections: usize,
    totals: Totals,
    job_log: Option<JobLogStatus>,
    /// This node's incarnation, on a server started with --cluster (see /api/cluster).
    cluster_node: Option<u64>,
    functions: Vec<FunctionView>,
}

async fn status(State(shared): State<Arc<Shared>>) -> Json<StatusReply> {
    let (functions, connections, totals, node) = {
        let broker = shared.broker.lock().unwrap();
        (broker.functions_view(), broker.connection_count(), broker.totals(), broker.cluster_node())
    };
    let info = &shared.admin_info;
    Json(StatusReply {
        version: env!("CARGO_PKG_VERSION").into(),
        uptime_secs: shared.started.elapsed().as_secs(),
        connections,
        totals,
        job_log: info.job_log.as_ref().map(|log| JobLogStatus {
            sink: log.sink,
            written: log.stats.written(),
            dropped: log.stats.dropped(),
            size: log.stats.usage().map(|u| JobLogSize {
                bytes: u.bytes,
                max_bytes: u.max_bytes,
                expired_bytes_age: u.expired_by_age,
                expired_bytes_size: u.expired_by_size,
            }),
        }),
        cluster_node: shared.cluster.as_ref().map(|_| node),
        functions,
    })
}

/// Every node of the cluster (404 on a server without --cluster).
async fn cluster(State(shared): State<Arc<Shared>>) -> ApiResult<crate::cluster::ClusterView> {
    match &shared.cluster {
        Some(cluster) => Ok(Json(cluster.view.lock().unwrap().clone())),
        None => Err(ApiError::not_found("this server runs without --cluster")),
    }
}

async fn workers(State(shared): State<Arc<Shared>>) -> Json<Vec<WorkerView>> {
    Json(shared.broker.lock().unwrap().workers_view())
}

async fn function_jobs(State(shared): State<Arc<Shared>>, Path(name): Path<String>) -> ApiResult<Vec<JobView>> {
    let jobs = shared.broker.lock().unwrap().jobs_view(&name, JOBS_LISTED);
    jobs.map(Json).ok_or_else(|| ApiError::not_found(format!("no function {name:?}")))
}

async fn search(shared: &Shared, query: Query) -> Result<Vec<Record>, ApiError> {
    let Some(search) = &shared.job_log else {
        return Err(ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "the job log is off (--job-log none)"));
    };
    search.search(query).await.map_err(|e| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, e.to_string()))
}

#[derive(Serialize)]
struct LogReply {
    records: Vec<Record>,
}

async fn log(State(shared): State<Arc<Shared>>, RawQuery(query): RawQuery) -> ApiResult<LogReply> {
    let query =
        Query::parse(query.as_deref().unwrap_or(""), gearbox_joblog::now_millis()).map_err(ApiError::bad_request)?;
    Ok(Json(LogReply { records: search(&shared, query).await? }))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SubmitBody {
    function: String,
    /// Text, or `{"base64": "..."}`.
    #[serde(default)]
    payload: Option<Body>,
    #[serde(default)]
    priority: Option<String>,
    #[serde(default)]
    unique: Option<String>,
    #[serde(default = "yes")]
    background: bool,
    /// Foreground only: how long to wait for the result.
    #[serde(default)]
    wait_ms: Option<u64>,
}

fn yes() -> bool {
    true
}

#[derive(Serialize)]
struct SubmitReply {
    handle: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    status: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    result: Option<Body>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

/// Submits a job as a Gearman client would; a foreground job is waited for.
async fn submit(
    State(shared): State<Arc<Shared>>,
    body: Result<Json<SubmitBody>, axum::extract::rejection::JsonRejection>,
) -> ApiResult<SubmitReply> {
    let Json(body) = body.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let priority = match body.priority.as_deref().unwrap_or("normal") {
        "high" => Priority::High,
        "normal" => Priority::Normal,
        "low" => Priority::Low,
        other => return Err(ApiError::bad_request(format!("priority {other:?} is not high, normal or low"))),
    };
    let wait = body.wait_ms.map_or(DEFAULT_WAIT, Duration::from_millis).min(MAX_WAIT);
    let mut conn = LocalConn::open(&shared);
    if !body.background {
        conn.send(Request::OptionReq { option: bytes::Bytes::from_static(b"exceptions") });
        conn.recv().await;
    }
    conn.send(Request::SubmitJob {
        function: body.function.into(),
        unique: body.unique.unwrap_or_default().into(),
        data: body.payload.map(|p| p.to_bytes()).unwrap_or_default().into(),
        priority,
        background: body.background,
    });
    let handle = match conn.recv().await {
        Reply::JobCreated { handle } => String::from_utf8_lossy(&handle).into_owned(),
        Reply::Error { code, text } => {
            let status = match &code[..] {
                b"QUEUE_ERROR" => StatusCode::SERVICE_UNAVAILABLE,
                _ => StatusCode::BAD_REQUEST,
            };
            return Err(ApiError::new(status, String::from_utf8_lossy(&text)));
        }
        other => return Err(ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, format!("unexpected reply {other:?}"))),
    };
    if body.background {
        return Ok(Json(SubmitReply { handle, status: None, result: None, error: None }));
    }
    let outcome = tokio::time::timeout(wait, async {
        loop {
            match conn.recv().await {
                Reply::WorkComplete { data, .. } => return ("complete", Some(Body::from_bytes(&data)), None),
                Reply::WorkFail { .. } => return ("fail", None, None),
                Reply::WorkException { data, .. } => {
                    return ("exception", None, Some(String::from_utf8_lossy(&data).into_owned()))
                }
                _ => {} // progress, data and warnings are not relayed
            }
        }
    })
    .await;
    match outcome {
        Ok((status, result, error)) => Ok(Json(SubmitReply { handle, status: Some(status), result, error })),
        Err(_) => Err(ApiError::new(
            StatusCode::GATEWAY_TIMEOUT,
            format!("no result for {handle} within {} ms", wait.as_millis()),
        )),
    }
}

#[derive(Serialize)]
struct JobReply {
    handle: String,
    /// Still on the server (queued, scheduled or running).
    known: bool,
    running: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    state: Option<&'static str>,
    numerator: u32,
    denominator: u32,
    /// The newest job-log record of this handle, once an attempt has ended.
    record: Option<Record>,
}

async fn job(State(shared): State<Arc<Shared>>, Path(handle): Path<String>) -> ApiResult<JobReply> {
    let view = shared.broker.lock().unwrap().job_view(&handle);
    let record = match &shared.job_log {
        Some(_) => search(&shared, Query { handle: Some(handle.clone()), limit: 1, ..Query::default() })
            .await?
            .into_iter()
            .next(),
        None => None,
    };
    if view.is_none() && record.is_none() {
        return Err(ApiError::not_found(format!("no job {handle}")));
    }
    Ok(Json(JobReply {
        handle,
        known: view.is_some(),
        running: view.as_ref().is_some_and(|v| v.state == "running"),
        state: view.as_ref().map(|v| v.state),
        numerator: view.as_ref().map_or(0, |v| v.numerator),
        denominator: view.as_ref().map_or(0, |v| v.denominator),
        record,
    }))
}

async fn cancel(
    State(shared): State<Arc<Shared>>,
    Path(handle): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let outcome = {
        let mut broker = shared.broker.lock().unwrap();
        // Waiting clients are told from here: nothing else is applying packets.
        broker.begin_external();
        broker.cancel_job(handle.as_bytes())
    };
    match outcome {
        Ok(()) => Ok(Json(json!({ "cancelled": true }))),
        Err(CancelError::Unknown) => Err(ApiError::not_found(format!("no queued job {handle}"))),
        Err(CancelError::Running) => {
            Err(ApiError::new(StatusCode::CONFLICT, format!("{handle} is running; it cannot be cancelled")))
        }
    }
}
