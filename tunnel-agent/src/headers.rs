//! Header translation between tunnel frames and hyper, dropping hop-by-hop headers: they describe
//! the edge↔client or agent↔origin connection, not the message. `upgrade` and
//! `connection: upgrade` survive on upgrade requests and `101` responses.

use bytes::Bytes;
use http::header::{CONNECTION, HeaderMap, HeaderName, HeaderValue, UPGRADE};
use tunnel_proto::Headers;

const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub(crate) enum HeaderError {
    #[error("invalid header name {0:?}")]
    Name(String),
    #[error("invalid value for header {0}")]
    Value(String),
}

fn is_hop_by_hop(name: &str, connection_tokens: &[String]) -> bool {
    HOP_BY_HOP.contains(&name)
        || name.starts_with("proxy-")
        || connection_tokens.iter().any(|t| t == name)
}

/// Lower-cased tokens listed in `Connection` headers (they name more hop-by-hop headers).
fn connection_tokens<'a>(values: impl Iterator<Item = &'a [u8]>) -> Vec<String> {
    values
        .filter_map(|v| std::str::from_utf8(v).ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().to_ascii_lowercase())
        .filter(|t| !t.is_empty())
        .collect()
}

/// Whether a request asks for a protocol upgrade (WebSocket and friends).
pub(crate) fn is_upgrade_request(headers: &Headers) -> bool {
    headers
        .iter()
        .any(|(n, v)| n.eq_ignore_ascii_case(b"upgrade") && !v.is_empty())
}

/// Frame headers → hyper request headers (end-to-end only, plus the upgrade pair if `upgrade`).
pub(crate) fn to_header_map(headers: &Headers, upgrade: bool) -> Result<HeaderMap, HeaderError> {
    let tokens = connection_tokens(
        headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(b"connection"))
            .map(|(_, v)| v.as_ref()),
    );
    let mut map = HeaderMap::with_capacity(headers.len());
    let mut upgrade_value = None;
    for (name, value) in headers {
        let name = HeaderName::from_bytes(name)
            .map_err(|_| HeaderError::Name(String::from_utf8_lossy(name).into_owned()))?;
        let value = HeaderValue::from_maybe_shared(value.clone())
            .map_err(|_| HeaderError::Value(name.as_str().to_owned()))?;
        if name == UPGRADE {
            upgrade_value = Some(value);
            continue;
        }
        // gRPC origins need `te: trailers` (the edge forwards only that value).
        let te_trailers = name == http::header::TE && value.as_bytes() == b"trailers";
        if is_hop_by_hop(name.as_str(), &tokens) && !te_trailers {
            continue;
        }
        map.append(name, value);
    }
    if upgrade && let Some(v) = upgrade_value {
        map.insert(UPGRADE, v);
        map.insert(CONNECTION, HeaderValue::from_static("upgrade"));
    }
    Ok(map)
}

/// hyper response (or trailer) headers → frame headers, end-to-end only (plus the upgrade pair
/// when `upgrade`, i.e. on a `101`).
pub(crate) fn from_header_map(map: &HeaderMap, upgrade: bool) -> Headers {
    let tokens = connection_tokens(map.get_all(CONNECTION).iter().map(HeaderValue::as_bytes));
    let mut out = Vec::with_capacity(map.len());
    for (name, value) in map {
        if upgrade && name == UPGRADE {
            out.push((
                Bytes::from_static(b"upgrade"),
                Bytes::copy_from_slice(value.as_bytes()),
            ));
            continue;
        }
        if is_hop_by_hop(name.as_str(), &tokens) {
            continue;
        }
        out.push((
            Bytes::copy_from_slice(name.as_str().as_bytes()),
            Bytes::copy_from_slice(value.as_bytes()),
        ));
    }
    if upgrade {
        out.push((
            Bytes::from_static(b"connection"),
            Bytes::from_static(b"upgrade"),
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn h(pairs: &[(&str, &str)]) -> Headers {
        pairs
            .iter()
            .map(|(n, v)| {
                (
                    Bytes::copy_from_slice(n.as_bytes()),
                    Bytes::copy_from_slice(v.as_bytes()),
                )
            })
            .collect()
    }

    #[test]
    fn drops_hop_by_hop_on_requests() {
        let headers = h(&[
            ("host", "example.com"),
            ("connection", "keep-alive, x-secret"),
            ("keep-alive", "timeout=5"),
            ("proxy-authorization", "Basic x"),
            ("te", "trailers"),
            ("transfer-encoding", "chunked"),
            ("x-secret", "1"),
            ("accept", "a"),
            ("accept", "b"),
        ]);
        let map = to_header_map(&headers, false).unwrap();
        assert_eq!(map.len(), 4);
        assert_eq!(map.get("host").unwrap(), "example.com");
        assert_eq!(map.get("te").unwrap(), "trailers");
        assert_eq!(map.get_all("accept").iter().count(), 2);
        assert!(map.get("x-secret").is_none());
    }

    #[test]
    fn keeps_upgrade_pair_for_upgrades() {
        let headers = h(&[
            ("connection", "Upgrade"),
            ("upgrade", "websocket"),
            ("sec-websocket-key", "k"),
        ]);
        assert!(is_upgrade_request(&headers));
        let map = to_header_map(&headers, true).unwrap();
        assert_eq!(map.get(UPGRADE).unwrap(), "websocket");
        assert_eq!(map.get(CONNECTION).unwrap(), "upgrade");
        assert_eq!(map.get("sec-websocket-key").unwrap(), "k");
        let plain = to_header_map(&headers, false).unwrap();
        assert!(plain.get(UPGRADE).is_none());
        assert!(!is_upgrade_request(&h(&[("host", "x")])));
    }

    #[test]
    fn invalid_headers_are_errors() {
        assert!(matches!(
            to_header_map(&h(&[("bad name", "v")]), false),
            Err(HeaderError::Name(_))
        ));
        let bad_value = vec![(Bytes::from_static(b"x"), Bytes::from_static(b"a\nb"))];
        assert!(matches!(
            to_header_map(&bad_value, false),
            Err(HeaderError::Value(_))
        ));
    }

    #[test]
    fn response_headers() {
        let mut map = HeaderMap::new();
        map.insert("content-type", HeaderValue::from_static("text/plain"));
        map.insert("transfer-encoding", HeaderValue::from_static("chunked"));
        map.insert("connection", HeaderValue::from_static("upgrade"));
        map.insert("upgrade", HeaderValue::from_static("websocket"));
        let out = from_header_map(&map, false);
        assert_eq!(out, h(&[("content-type", "text/plain")]));
        let out = from_header_map(&map, true);
        assert!(out.contains(&(
            Bytes::from_static(b"upgrade"),
            Bytes::from_static(b"websocket")
        )));
        assert!(out.contains(&(
            Bytes::from_static(b"connection"),
            Bytes::from_static(b"upgrade")
        )));
        assert_eq!(out.len(), 3);
    }
}
