//! The HTTP side (`--http`, default 127.0.0.1:4731): the dashboard at `/`, Prometheus metrics
//! at `/metrics`, and a JSON API under `/api` (described by `/api/openapi.json`), over HTTPS
//! with `--http-ssl` ([`https`]) and behind tokens with `--http-token` ([`auth`]). Everything
//! here reads copies of the broker's state taken under its lock, or talks to the broker as a
//! Gearman client would ([`local::LocalConn`]), so the job path never waits on HTTP.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::connect_info::Connected;
use axum::extract::FromRef;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Router};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::shared::Shared;

mod api;
mod auth;
mod https;
mod lifecycle;
pub(crate) mod local;
mod metrics;
mod sessions;

pub use auth::check_exposure;

const DASHBOARD: &str = include_str!("dashboard.html");
/// Where the dashboard page gets the session's CSRF token (empty without a session).
const DASHBOARD_CSRF: &str = "<meta name=\"gearbox-csrf\" content=\"\">";
const OPENAPI: &str = include_str!("openapi.json");

/// The default HTTP address: loopback only, next to the Gearman port.
pub const DEFAULT_ADDR: &str = "127.0.0.1:4731";

/// What `--http` asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HttpSpec {
    Off,
    /// The default address: if it is busy, the server warns and runs without HTTP.
    Default,
    /// An address the user gave: failing to bind it is fatal.
    At(String),
}

impl HttpSpec {
    pub fn parse(s: Option<&str>) -> HttpSpec {
        match s {
            None => HttpSpec::Default,
            Some("off" | "none") => HttpSpec::Off,
            Some(addr) => HttpSpec::At(addr.to_owned()),
        }
    }

    /// Binds the listener; `Ok(None)` when HTTP is off or the default address is taken.
    pub async fn bind(&self) -> std::io::Result<Option<TcpListener>> {
        match self {
            HttpSpec::Off => Ok(None),
            HttpSpec::Default => match TcpListener::bind(DEFAULT_ADDR).await {
                Ok(l) => Ok(Some(l)),
                Err(e) => {
                    tracing::warn!("HTTP (dashboard, metrics, API) is off: cannot listen on {DEFAULT_ADDR}: {e}; choose another address with --http ADDR:PORT");
                    Ok(None)
                }
            },
            HttpSpec::At(addr) => TcpListener::bind(addr)
                .await
                .map(Some)
                .map_err(|e| std::io::Error::new(e.kind(), format!("cannot listen for HTTP on {addr}: {e}"))),
        }
    }
}

/// How often the totals are sampled for the dashboard's throughput chart...
const SAMPLE_EVERY: Duration = Duration::from_secs(5);
/// ...and how many samples are kept (10 minutes).
const SAMPLES_KEPT: usize = 120;

/// The totals at one moment, for throughput over the last minutes.
#[derive(Clone, Copy, serde::Serialize)]
struct Sample {
    at_ms: i64,
    uptime_secs: u64,
    submitted: u64,
    completed: u64,
    failed: u64,
}

/// The samples of the last minutes, oldest first.
type History = Arc<Mutex<VecDeque<Sample>>>;

#[derive(Clone)]
struct AppState {
    shared: Arc<Shared>,
    history: History,
    auth: Arc<auth::Auth>,
}

impl FromRef<AppState> for Arc<auth::Auth> {
    fn from_ref(state: &AppState) -> Arc<auth::Auth> {
        state.auth.clone()
    }
}

/// The address a request came from, for the audit log.
#[derive(Clone, Copy)]
struct Peer(SocketAddr);

impl Connected<axum::serve::IncomingStream<'_, TcpListener>> for Peer {
    fn connect_info(stream: axum::serve::IncomingStream<'_, TcpListener>) -> Peer {
        Peer(*stream.remote_addr())
    }
}

impl Connected<axum::serve::IncomingStream<'_, https::HttpsListener>> for Peer {
    fn connect_info(stream: axum::serve::IncomingStream<'_, https::HttpsListener>) -> Peer {
        Peer(*stream.remote_addr())
    }
}

impl FromRef<AppState> for Arc<Shared> {
    fn from_ref(state: &AppState) -> Arc<Shared> {
        state.shared.clone()
    }
}

impl FromRef<AppState> for History {
    fn from_ref(state: &AppState) -> History {
        state.history.clone()
    }
}

fn sample(shared: &Shared) -> Sample {
    let totals = shared.broker.lock().unwrap().totals();
    Sample {
        at_ms: gearbox_joblog::now_millis(),
        uptime_secs: shared.started.elapsed().as_secs(),
        submitted: totals.submitted,
        completed: totals.completed,
        failed: totals.failed,
    }
}

/// Samples the totals every [`SAMPLE_EVERY`] until `shutdown`.
async fn keep_history(shared: Arc<Shared>, history: History, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(SAMPLE_EVERY);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let s = sample(&shared);
        let mut history = history.lock().unwrap();
        if history.len() == SAMPLES_KEPT {
            history.pop_front();
        }
        history.push_back(s);
    }
}

/// `/api/throughput`: the samples of the last minutes, oldest first, and the server's clock.
async fn throughput(axum::extract::State(history): axum::extract::State<History>) -> axum::Json<serde_json::Value> {
    let samples: Vec<Sample> = history.lock().unwrap().iter().copied().collect();
    axum::Json(serde_json::json!({
        "now_ms": gearbox_joblog::now_millis(),
        "interval_secs": SAMPLE_EVERY.as_secs(),
        "samples": samples,
    }))
}

/// An HTML page that no cache keeps (it may carry a CSRF token) and no other site may frame.
fn html(status: StatusCode, page: String) -> Response {
    let headers = [
        (header::CONTENT_TYPE, "text/html; charset=utf-8"),
        (header::CACHE_CONTROL, "no-store"),
        (header::X_FRAME_OPTIONS, "DENY"),
        (header::CONTENT_SECURITY_POLICY, "frame-ancestors 'none'"),
    ];
    (status, headers, page).into_response()
}

/// `/`: the dashboard, with the CSRF token of the session it was asked with.
async fn dashboard(csrf: Option<Extension<auth::Csrf>>) -> Response {
    let page = match csrf {
        Some(Extension(auth::Csrf(token))) => {
            DASHBOARD.replacen(DASHBOARD_CSRF, &format!("<meta name=\"gearbox-csrf\" content=\"{token}\">"), 1)
        }
        None => DASHBOARD.to_owned(),
    };
    html(StatusCode::OK, page)
}

fn router(state: AppState) -> Router {
    let guard = axum::middleware::from_fn_with_state(state.auth.clone(), auth::guard);
    Router::new()
        .route("/", get(dashboard))
        .route("/login", post(auth::login))
        .route("/logout", post(auth::logout))
        .route("/metrics", get(metrics::render))
        .route("/api/throughput", get(throughput))
        .route("/api/openapi.json", get(|| async { ([(header::CONTENT_TYPE, "application/json")], OPENAPI) }))
        .nest("/api", api::routes())
        .fallback(|| async { api::ApiError::not_found("no such page").into_response() })
        .layer(guard)
        .with_state(state)
}

/// Serves HTTP on `listener` until `shutdown`: HTTPS if the security settings say so.
pub(crate) async fn serve(listener: TcpListener, shared: Arc<Shared>, shutdown: CancellationToken) {
    let security = shared.security.clone();
    let https = security.http.tls;
    let addr = match listener.local_addr() {
        Ok(addr) => addr,
        Err(e) => return tracing::error!("HTTP is off: {e}"),
    };
    if https && security.tls.is_none() {
        return tracing::error!("HTTP is off: HTTPS needs --ssl-certificate and --ssl-key");
    }
    let auth = Arc::new(auth::Auth::new(security.clone(), addr, https));
    if auth.insecure_cookie() {
        tracing::warn!("the dashboard's login cookie goes over plain HTTP on {addr}, readable on the way: serve HTTPS with --http-ssl");
    }
    let history = Arc::new(Mutex::new(VecDeque::with_capacity(SAMPLES_KEPT)));
    tokio::spawn(keep_history(shared.clone(), history.clone(), shutdown.clone()));
    let app = router(AppState { shared, history, auth }).into_make_service_with_connect_info::<Peer>();
    let stopped = shutdown.clone().cancelled_owned();
    let served = if https {
        let listener = match https::HttpsListener::start(listener, security, shutdown) {
            Ok(listener) => listener,
            Err(e) => return tracing::error!("HTTP is off: {e}"),
        };
        tracing::info!("dashboard, metrics and API on https://{addr}/");
        axum::serve(listener, app).with_graceful_shutdown(stopped).await
    } else {
        tracing::info!("dashboard, metrics and API on http://{addr}/");
        axum::serve(listener, app).with_graceful_shutdown(stopped).await
    };
    if let Err(e) = served {
        tracing::error!("HTTP server failed: {e}");
    }
}
