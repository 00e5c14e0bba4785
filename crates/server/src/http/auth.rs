//! Who may use the HTTP side.
//!
//! With `--http-token` (or `--http-read-token`) every request needs a credential: either
//! `Authorization: Bearer TOKEN`, or the dashboard's session cookie, which `POST /login` sets
//! for a token typed into the login page. A read-only token may GET everything; changes (any
//! method but GET, HEAD and OPTIONS) need an admin token, and, when they come with the cookie,
//! the session's CSRF token in `X-CSRF-Token` (the dashboard finds it in its page). Tokens are
//! compared by their SHA-256 digests, in constant time.
//!
//! With or without tokens, a change whose `Origin` is not this server is refused, so that a
//! page on another site cannot make a browser change anything here. Every refusal is audited
//! (`gearbox_refused_total{action="http"}`).

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{ConnectInfo, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Form;
use sha2::{Digest, Sha256};
use subtle::{Choice, ConstantTimeEq};

use super::api::ApiError;
use super::sessions::{Session, Sessions, LIFETIME};
use super::Peer;
use crate::security::{HttpAuthOptions, Refused, Security};

const LOGIN_PAGE: &str = include_str!("login.html");
/// Where the login page says what went wrong.
const LOGIN_MESSAGE: &str = "<!--MESSAGE-->";

/// What a token, or the session it opened, may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Role {
    Admin,
    Read,
}

/// The HTTP side's tokens, sessions and cookie settings.
pub(super) struct Auth {
    security: Arc<Security>,
    admin: Vec<[u8; 32]>,
    read: Vec<[u8; 32]>,
    sessions: Sessions,
    /// `gearbox_session_PORT`: servers on one host (whose cookies browsers share across
    /// ports) keep their logins apart.
    cookie: String,
    /// `Secure` on the cookie: served over HTTPS, or on loopback, where browsers take it.
    secure_cookie: bool,
}

/// The CSRF token of the session a request came with, for the dashboard to embed.
#[derive(Clone)]
pub(super) struct Csrf(pub String);

/// What a request proved.
enum Credential {
    None,
    /// An `Authorization` header with a token this server does not know.
    Wrong,
    Bearer(Role),
    Cookie(Session),
}

impl Auth {
    pub fn new(security: Arc<Security>, local: SocketAddr, https: bool) -> Auth {
        let digests = |tokens: &[String]| tokens.iter().map(|t| digest(t)).collect();
        Auth {
            admin: digests(&security.http.admin_tokens),
            read: digests(&security.http.read_tokens),
            sessions: Sessions::default(),
            cookie: format!("gearbox_session_{}", local.port()),
            secure_cookie: https || local.ip().to_canonical().is_loopback(),
            security,
        }
    }

    fn options(&self) -> &HttpAuthOptions {
        &self.security.http
    }

    /// Whether the login cookie goes out without `Secure` (plain HTTP on a network address).
    pub fn insecure_cookie(&self) -> bool {
        self.options().has_tokens() && !self.secure_cookie
    }

    fn role_of(&self, token: &str) -> Option<Role> {
        let token = digest(token);
        let known = |digests: &[[u8; 32]]| digests.iter().fold(Choice::from(0), |any, d| any | d.ct_eq(&token));
        if known(&self.admin).into() {
            Some(Role::Admin)
        } else if known(&self.read).into() {
            Some(Role::Read)
        } else {
            None
        }
    }

    fn credential(&self, headers: &HeaderMap) -> Credential {
        if let Some(value) = headers.get(header::AUTHORIZATION) {
            let token = value
                .to_str()
                .ok()
                .and_then(|v| v.split_once(' '))
                .and_then(|(scheme, token)| scheme.eq_ignore_ascii_case("bearer").then_some(token.trim()));
            return match token.and_then(|t| self.role_of(t)) {
                Some(role) => Credential::Bearer(role),
                None => Credential::Wrong,
            };
        }
        match self.session_id(headers).and_then(|id| self.sessions.get(id)) {
            Some(session) => Credential::Cookie(session),
            None => Credential::None,
        }
    }

    fn session_id<'h>(&self, headers: &'h HeaderMap) -> Option<&'h str> {
        headers
            .get_all(header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(';'))
            .filter_map(|pair| pair.trim().split_once('='))
            .find_map(|(name, value)| (name == self.cookie).then_some(value))
    }

    fn set_cookie(&self, value: &str, max_age: u64) -> HeaderValue {
        let secure = if self.secure_cookie { "; Secure" } else { "" };
        let cookie = format!("{}={value}; Path=/; Max-Age={max_age}; HttpOnly; SameSite=Strict{secure}", self.cookie);
        HeaderValue::from_str(&cookie).expect("hex and ASCII")
    }

    fn refuse(&self, identity: &str, peer: SocketAddr, method: &Method, path: &str) {
        self.security.audit.refused(Refused::Http, identity, &peer.to_string(), &format!("{method} {path}"));
    }
}

fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// The middleware in front of every route.
pub(super) async fn guard(
    State(auth): State<Arc<Auth>>,
    ConnectInfo(Peer(peer)): ConnectInfo<Peer>,
    mut request: Request,
    next: Next,
) -> Response {
    let method = request.method().clone();
    let path = request.uri().path().to_owned();
    let changes = !matches!(method, Method::GET | Method::HEAD | Method::OPTIONS);
    let refuse = |identity: &str, status: StatusCode, message: &str| {
        auth.refuse(identity, peer, &method, &path);
        ApiError::new(status, message).into_response()
    };
    if changes && cross_origin(request.headers()) {
        return refuse("-", StatusCode::FORBIDDEN, "refused: the request comes from a page of another site (Origin)");
    }
    let options = auth.options();
    let open = match path.as_str() {
        // They check the token or the cookie themselves.
        "/login" | "/logout" => true,
        "/metrics" => options.open_metrics && !changes,
        _ => false,
    };
    if !options.has_tokens() && !options.insecure && !local_host_name(request.headers()) {
        // A page whose name was re-pointed at 127.0.0.1 (DNS rebinding) reaches a tokenless
        // loopback listener with its own name in Host: only addresses and localhost are served.
        return refuse(
            "-",
            StatusCode::FORBIDDEN,
            "refused: without --http-token, HTTP answers only to an IP address or localhost in Host",
        );
    }
    if open || !options.has_tokens() {
        return next.run(request).await;
    }
    match auth.credential(request.headers()) {
        Credential::Bearer(Role::Read) | Credential::Cookie(Session { role: Role::Read, .. }) if changes => {
            refuse("read-token", StatusCode::FORBIDDEN, "this token may only read")
        }
        Credential::Bearer(_) => next.run(request).await,
        Credential::Cookie(session) => {
            let sent = request.headers().get("x-csrf-token").map(HeaderValue::as_bytes).unwrap_or_default();
            if changes && !bool::from(sent.ct_eq(session.csrf.as_bytes())) {
                return refuse("session", StatusCode::FORBIDDEN, "missing or wrong X-CSRF-Token");
            }
            request.extensions_mut().insert(Csrf(session.csrf));
            next.run(request).await
        }
        // A browser that is not logged in gets the login page in place of the dashboard.
        Credential::None if path == "/" && matches!(method, Method::GET | Method::HEAD) => {
            login_page(StatusCode::OK, "")
        }
        Credential::None => unauthorized(
            refuse("-", StatusCode::UNAUTHORIZED, "this server needs a token: send Authorization: Bearer TOKEN"),
            "",
        ),
        Credential::Wrong => {
            unauthorized(refuse("-", StatusCode::UNAUTHORIZED, "wrong token"), ", error=\"invalid_token\"")
        }
    }
}

fn unauthorized(mut response: Response, error: &str) -> Response {
    let challenge = HeaderValue::from_str(&format!("Bearer realm=\"gearbox\"{error}")).expect("ASCII");
    response.headers_mut().insert(header::WWW_AUTHENTICATE, challenge);
    response
}

/// Whether a request names, in `Origin`, a site other than the one it was sent to (`Host`,
/// or `X-Forwarded-Host` behind a proxy). The scheme is not compared: a proxy may take HTTPS
/// and forward HTTP, and one port serves one of them anyway. Requests without `Origin` (not
/// from a browser, or a same-origin GET) pass.
fn cross_origin(headers: &HeaderMap) -> bool {
    let Some(origin) = headers.get(header::ORIGIN) else { return false };
    // `null` (a sandboxed frame, a file) or anything without a host is foreign.
    let Some((_, authority)) = origin.to_str().ok().and_then(|o| o.split_once("://")) else { return true };
    let named = |name: &str| {
        headers.get(name).and_then(|v| v.to_str().ok()).is_some_and(|host| host.eq_ignore_ascii_case(authority))
    };
    !(named(header::HOST.as_str()) || named("x-forwarded-host"))
}

/// Whether `Host` names an IP address or localhost (a name no page can re-point).
fn local_host_name(headers: &HeaderMap) -> bool {
    let Some(host) = headers.get(header::HOST).and_then(|h| h.to_str().ok()) else { return true };
    let name = match host.rsplit_once(':') {
        Some((name, port)) if !name.is_empty() && port.bytes().all(|b| b.is_ascii_digit()) => name,
        _ => host,
    };
    let name = name.trim_start_matches('[').trim_end_matches(']');
    name.parse::<std::net::IpAddr>().is_ok()
        || name.eq_ignore_ascii_case("localhost")
        || name.to_ascii_lowercase().ends_with(".localhost")
}

/// The login page, saying `message` (HTML) if any.
fn login_page(status: StatusCode, message: &str) -> Response {
    super::html(status, LOGIN_PAGE.replacen(LOGIN_MESSAGE, message, 1))
}

#[derive(serde::Deserialize)]
pub(super) struct LoginForm {
    #[serde(default)]
    token: String,
}

/// `POST /login`: a token from the login page opens a session; the answer sends the browser
/// to the dashboard with the session cookie.
pub(super) async fn login(
    State(auth): State<Arc<Auth>>,
    ConnectInfo(Peer(peer)): ConnectInfo<Peer>,
    Form(form): Form<LoginForm>,
) -> Response {
    if !auth.options().has_tokens() {
        return to_dashboard(None);
    }
    match auth.role_of(form.token.trim()) {
        Some(role) => {
            let (id, _) = auth.sessions.open(role);
            to_dashboard(Some(auth.set_cookie(&id, LIFETIME.as_secs())))
        }
        None => {
            auth.refuse("-", peer, &Method::POST, "/login");
            login_page(StatusCode::UNAUTHORIZED, "<p class=\"error\">Wrong token.</p>")
        }
    }
}

/// `POST /logout`: ends the session and clears the cookie.
pub(super) async fn logout(State(auth): State<Arc<Auth>>, headers: HeaderMap) -> Response {
    if let Some(id) = auth.session_id(&headers) {
        auth.sessions.close(id);
    }
    to_dashboard(Some(auth.set_cookie("", 0)))
}

/// A 303 to `/`, setting `cookie` if any.
fn to_dashboard(cookie: Option<HeaderValue>) -> Response {
    let mut response = (StatusCode::SEE_OTHER, [(header::LOCATION, "/")]).into_response();
    if let Some(cookie) = cookie {
        response.headers_mut().insert(header::SET_COOKIE, cookie);
    }
    response
}

/// Refuses (at start) to serve HTTP without a token on an address other machines can reach,
/// unless `--http-insecure` says so; warns when it does.
pub fn check_exposure(addr: SocketAddr, options: &HttpAuthOptions, acl: bool) -> std::io::Result<()> {
    if options.has_tokens() {
        return Ok(());
    }
    // The API submits, cancels and reads jobs as no Gearman identity: with an access list,
    // an open HTTP side (even on loopback, for every local user) would go around it.
    if acl && !options.insecure {
        return Err(std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            format!(
                "refusing to serve HTTP on {addr} without --http-token while --acl is in force: its API \
                 submits, cancels and reads jobs outside the ACL; add a token (--http-token, \
                 --http-token-file or GEARBOX_HTTP_TOKEN), turn HTTP off (--http off), or --http-insecure"
            ),
        ));
    }
    if addr.ip().to_canonical().is_loopback() {
        return Ok(());
    }
    if !options.insecure {
        return Err(std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            format!(
                "refusing to serve HTTP on {addr} without --http-token: anyone who reaches it could submit, \
                 cancel and delete jobs; add a token (--http-token, --http-token-file or GEARBOX_HTTP_TOKEN) \
                 or --http-insecure"
            ),
        ));
    }
    tracing::warn!(
        "serving HTTP on {addr} without a token (--http-insecure): anyone who reaches it may change anything"
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        pairs.iter().map(|(k, v)| (k.parse().unwrap(), v.parse().unwrap())).collect()
    }

    #[test]
    fn origins_are_compared_with_the_host() {
        assert!(!cross_origin(&headers(&[("host", "127.0.0.1:4731")])));
        assert!(!cross_origin(&headers(&[("host", "127.0.0.1:4731"), ("origin", "http://127.0.0.1:4731")])));
        assert!(!cross_origin(&headers(&[("host", "Jobs.example.com"), ("origin", "https://jobs.example.com")])));
        assert!(cross_origin(&headers(&[("host", "127.0.0.1:4731"), ("origin", "http://127.0.0.1:8080")])));
        assert!(cross_origin(&headers(&[("host", "127.0.0.1:4731"), ("origin", "null")])));
        assert!(!cross_origin(&headers(&[
            ("host", "127.0.0.1:4731"),
            ("x-forwarded-host", "jobs.example.com"),
            ("origin", "https://jobs.example.com")
        ])));
    }

    #[test]
    fn only_loopback_is_served_without_a_token() {
        let none = HttpAuthOptions::default();
        let token = HttpAuthOptions { admin_tokens: vec!["x".repeat(16)], ..Default::default() };
        for loopback in ["127.0.0.1:4731", "127.1.2.3:80", "[::1]:4731", "[::ffff:127.0.0.1]:1"] {
            assert!(check_exposure(loopback.parse().unwrap(), &none, false).is_ok(), "{loopback}");
            assert!(check_exposure(loopback.parse().unwrap(), &none, true).is_err(), "{loopback} with an ACL");
        }
        let public = "0.0.0.0:4731".parse().unwrap();
        let refused = check_exposure(public, &none, false).unwrap_err().to_string();
        assert!(refused.starts_with("refusing to serve HTTP on 0.0.0.0:4731 without --http-token"), "{refused}");
        let insecure = HttpAuthOptions { insecure: true, ..Default::default() };
        assert!(check_exposure(public, &insecure, false).is_ok());
        assert!(check_exposure(public, &insecure, true).is_ok());
        assert!(check_exposure(public, &token, false).is_ok());
        assert!(check_exposure(public, &token, true).is_ok());
    }

    #[test]
    fn without_a_token_only_addresses_and_localhost_are_answered() {
        for ok in ["127.0.0.1:4731", "localhost:4731", "[::1]:4731", "LOCALHOST", "app.localhost:80", "10.0.0.7"] {
            assert!(local_host_name(&headers(&[("host", ok)])), "{ok}");
        }
        for rebound in ["evil.example:4731", "evil.example", "127.0.0.1.evil.example:4731"] {
            assert!(!local_host_name(&headers(&[("host", rebound)])), "{rebound}");
        }
    }
}
