//! The web console: static files built into the binary (no CDN, works offline), served under
//! `/console/`. It is a client of the API like any other: it holds a bearer credential in the
//! browser tab's session storage and the API enforces every role.

use axum::extract::Path;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;
use axum::Router;

/// (path under /console/, content type, bytes).
const FILES: &[(&str, &str, &[u8])] = &[
    (
        "index.html",
        "text/html; charset=utf-8",
        include_bytes!("../../console/index.html"),
    ),
    (
        "app.js",
        "text/javascript; charset=utf-8",
        include_bytes!("../../console/app.js"),
    ),
    (
        "app.css",
        "text/css; charset=utf-8",
        include_bytes!("../../console/app.css"),
    ),
    (
        "vendor/preact-htm.js",
        "text/javascript; charset=utf-8",
        include_bytes!("../../console/vendor/preact-htm.js"),
    ),
    (
        "vendor/uplot.js",
        "text/javascript; charset=utf-8",
        include_bytes!("../../console/vendor/uplot.js"),
    ),
    (
        "vendor/uplot.css",
        "text/css; charset=utf-8",
        include_bytes!("../../console/vendor/uplot.css"),
    ),
];

/// Content Security Policy: everything from this server; inline styles only (the chart sets
/// sizes on its elements); no inline scripts, no frames.
const CSP: &str = "default-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; frame-ancestors 'none'; base-uri 'none'; form-action 'none'";

pub(super) fn routes<S: Clone + Send + Sync + 'static>() -> Router<S> {
    Router::new()
        .route("/", get(|| async { Redirect::to("/console/") }))
        .route("/console", get(|| async { Redirect::to("/console/") }))
        .route("/console/", get(|| async { file("index.html") }))
        .route(
            "/console/*path",
            get(|Path(p): Path<String>| async move { file(&p) }),
        )
}

fn file(path: &str) -> Response {
    let Some((_, kind, body)) = FILES.iter().find(|(p, ..)| *p == path) else {
        // Client-side routes are in the fragment, so anything else is a wrong address.
        return (StatusCode::NOT_FOUND, "no such console file").into_response();
    };
    (
        [
            (header::CONTENT_TYPE, *kind),
            (header::CACHE_CONTROL, "no-cache"),
            (header::CONTENT_SECURITY_POLICY, CSP),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::REFERRER_POLICY, "no-referrer"),
        ],
        *body,
    )
        .into_response()
}

/// Bytes a first load transfers (every file once): the console's weight.
pub fn weight() -> usize {
    FILES.iter().map(|(_, _, b)| b.len()).sum()
}
