//! `GET /`: the dashboard, one static page embedded at build time. The page itself is public;
//! every piece of data it shows is fetched with the token from the URL fragment
//! (`http://127.0.0.1:7700/#token=…`), which browsers never send to the server.

use axum::http::header;
use axum::response::IntoResponse;

const PAGE: &str = include_str!("../assets/dashboard.html");

pub(crate) async fn serve() -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
            // The page only talks to us; nothing may frame it or inject scripts into it.
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; frame-ancestors 'none'",
            ),
            (header::REFERRER_POLICY, "no-referrer"),
        ],
        PAGE,
    )
}
