//! Header rewriting between client and tunnel, sans-IO.
//!
//! Hop-by-hop headers describe one connection and must not cross the proxy (RFC 9110 §7.6.1);
//! the `X-Forwarded-*` family tells the origin who the client was, since it only ever sees the agent.

use std::net::IpAddr;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use tunnel_proto::Headers;

/// Headers that never cross a proxy hop.
const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// Longest client-supplied `X-Request-Id` we pass through; longer ones are replaced.
const MAX_REQUEST_ID_LEN: usize = 200;

/// What the edge knows about a request that the origin should know too.
#[derive(Clone, Debug)]
pub(crate) struct ForwardCtx<'a> {
    pub(crate) client_ip: IpAddr,
    /// `http` or `https`.
    pub(crate) proto: &'static str,
    /// Host as the client sent it (Host header or :authority), port included.
    pub(crate) host: &'a str,
    /// The request asks for a protocol upgrade (`Upgrade` + `Connection: upgrade`).
    pub(crate) upgrade: bool,
}

/// Names listed in `Connection` (lower-case), which are hop-by-hop for this message.
fn connection_tokens(src: &HeaderMap) -> Vec<String> {
    src.get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().to_ascii_lowercase())
        .filter(|t| !t.is_empty())
        .collect()
}

fn is_hop_by_hop(name: &str, listed: &[String]) -> bool {
    HOP_BY_HOP.contains(&name) || listed.iter().any(|t| t == name)
}

/// Whether a request asks to switch protocols (HTTP/1.1 `Upgrade` with `Connection: upgrade`).
pub(crate) fn wants_upgrade(src: &HeaderMap) -> bool {
    src.contains_key(header::UPGRADE) && connection_tokens(src).iter().any(|t| t == "upgrade")
}

fn joined(src: &HeaderMap, name: &HeaderName) -> Option<String> {
    let parts: Vec<&str> = src
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|v| !v.is_empty())
        .collect();
    (!parts.is_empty()).then(|| parts.join(", "))
}

/// A fresh request id: 16 random bytes, hex.
pub(crate) fn new_request_id() -> String {
    hex::encode(rand::random::<[u8; 16]>())
}

/// The request id to forward: the client's when it is sane, else a fresh one.
pub(crate) fn request_id(src: &HeaderMap) -> String {
    src.get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|v| !v.is_empty() && v.len() <= MAX_REQUEST_ID_LEN)
        .map_or_else(new_request_id, str::to_owned)
}

/// Builds the header list sent to the agent: hop-by-hop removed, forwarding headers added.
pub(crate) fn request_headers(src: &HeaderMap, ctx: &ForwardCtx<'_>) -> Headers {
    let listed = connection_tokens(src);
    let mut out: Headers = Vec::with_capacity(src.len() + 8);
    let push = |out: &mut Headers, name: &'static str, value: String| {
        out.push((Bytes::from_static(name.as_bytes()), Bytes::from(value)));
    };
    // Shared by `host` and `x-forwarded-host` (one copy of the client's host per request).
    let host = Bytes::copy_from_slice(ctx.host.as_bytes());
    out.push((Bytes::from_static(b"host"), host.clone()));
    for (name, value) in src {
        let n = name.as_str();
        if is_hop_by_hop(n, &listed)
            || matches!(
                n,
                "host"
                    | "x-forwarded-for"
                    | "x-forwarded-proto"
                    | "x-forwarded-host"
                    | "forwarded"
                    | "via"
                    | "x-request-id"
                    // A peer edge's credential: never shown to an origin.
                    | crate::peers::HOP_HEADER
            )
        {
            continue;
        }
        out.push((
            Bytes::copy_from_slice(n.as_bytes()),
            Bytes::copy_from_slice(value.as_bytes()),
        ));
    }
    if ctx.upgrade
        && let Some(up) = src.get(header::UPGRADE)
    {
        out.push((
            Bytes::from_static(b"upgrade"),
            Bytes::copy_from_slice(up.as_bytes()),
        ));
        out.push((
            Bytes::from_static(b"connection"),
            Bytes::from_static(b"upgrade"),
        ));
    }
    // gRPC needs `te: trailers` end to end; any other TE value is hop-by-hop.
    if src
        .get_all(header::TE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| {
            v.split(',')
                .any(|t| t.trim().eq_ignore_ascii_case("trailers"))
        })
    {
        out.push((Bytes::from_static(b"te"), Bytes::from_static(b"trailers")));
    }

    let ip = ctx.client_ip.to_string();
    let xff = match joined(src, &HeaderName::from_static("x-forwarded-for")) {
        Some(prev) => format!("{prev}, {ip}"),
        None => ip.clone(),
    };
    push(&mut out, "x-forwarded-for", xff);
    out.push((
        Bytes::from_static(b"x-forwarded-proto"),
        Bytes::from_static(ctx.proto.as_bytes()),
    ));
    out.push((Bytes::from_static(b"x-forwarded-host"), host));
    let node = match ctx.client_ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(_) => format!("\"[{ip}]\""),
    };
    let quoted_host = if ctx.host.contains('"') {
        std::borrow::Cow::Owned(ctx.host.replace('"', ""))
    } else {
        std::borrow::Cow::Borrowed(ctx.host)
    };
    let this = format!("for={node};host=\"{quoted_host}\";proto={}", ctx.proto);
    let fwd = match joined(src, &header::FORWARDED) {
        Some(prev) => format!("{prev}, {this}"),
        None => this,
    };
    push(&mut out, "forwarded", fwd);
    let via = match joined(src, &header::VIA) {
        Some(prev) => Bytes::from(format!("{prev}, 1.1 meridian")),
        None => Bytes::from_static(b"1.1 meridian"),
    };
    out.push((Bytes::from_static(b"via"), via));
    push(&mut out, "x-request-id", request_id(src));
    out
}

/// A header name from wire bytes; the forwarding headers the edge adds to every request are
/// static names (`HeaderName::from_bytes` allocates a copy of any non-standard name).
pub(crate) fn header_name(name: &[u8]) -> Option<HeaderName> {
    const ADDED: [&str; 4] = [
        "x-forwarded-for",
        "x-forwarded-proto",
        "x-forwarded-host",
        "x-request-id",
    ];
    if let Some(n) = ADDED.iter().find(|n| n.as_bytes() == name) {
        return Some(HeaderName::from_static(n));
    }
    HeaderName::from_bytes(name).ok()
}

/// Converts the agent's response headers for the client: invalid entries and hop-by-hop headers
/// dropped (except the upgrade pair on a `101`).
pub(crate) fn response_headers(src: &Headers, switching_protocols: bool) -> HeaderMap {
    let mut map = HeaderMap::with_capacity(src.len() + 2);
    for (name, value) in src {
        let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(name),
            HeaderValue::from_maybe_shared(value.clone()),
        ) else {
            continue;
        };
        map.append(name, value);
    }
    let upgrade = map.get(header::UPGRADE).cloned();
    strip_hop_by_hop(&mut map);
    if switching_protocols && let Some(up) = upgrade {
        map.insert(header::UPGRADE, up);
        map.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
    map
}

/// Removes the headers that describe one connection (and those its `Connection` lists).
pub(crate) fn strip_hop_by_hop(map: &mut HeaderMap) {
    let listed = connection_tokens(map);
    let hop: Vec<HeaderName> = map
        .keys()
        .filter(|n| is_hop_by_hop(n.as_str(), &listed))
        .cloned()
        .collect();
    for n in hop {
        map.remove(n);
    }
}

/// RFC 8441: a WebSocket over an HTTP/2 extended CONNECT stream reaches the origin as the
/// HTTP/1.1 handshake it understands. Adds `Upgrade: websocket` and a fresh `Sec-WebSocket-Key`
/// (HTTP/2 clients send none; the key only proves the origin speaks WebSocket, and the edge checks
/// nothing of its answer since the client never sees `Sec-WebSocket-Accept`).
pub(crate) fn extended_connect_as_upgrade(map: &mut HeaderMap) {
    map.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    map.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    let key = base64(&rand::random::<[u8; 16]>());
    if let Ok(v) = HeaderValue::from_str(&key) {
        map.insert(header::SEC_WEBSOCKET_KEY, v);
    }
}

/// The origin's `101` as an HTTP/2 extended CONNECT answer: `200`, without the HTTP/1.1-only
/// handshake headers (RFC 8441 §5).
pub(crate) fn upgrade_as_extended_connect(map: &mut HeaderMap) {
    for h in [
        header::UPGRADE,
        header::CONNECTION,
        header::SEC_WEBSOCKET_ACCEPT,
        header::CONTENT_LENGTH,
    ] {
        map.remove(h);
    }
}

/// Standard base64 with padding (RFC 4648 §4), for the 16-byte WebSocket key.
fn base64(bytes: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(T[((n >> (18 - 6 * i)) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Stamps the `Meridian-Region` / `Meridian-Edge` pair on any response.
pub(crate) fn stamp_response(map: &mut HeaderMap, region: &HeaderValue, edge: &HeaderValue) {
    map.insert(HeaderName::from_static("meridian-region"), region.clone());
    map.insert(HeaderName::from_static("meridian-edge"), edge.clone());
}

#[cfg(test)]
mod tests {
    use super::*;

    fn get<'a>(h: &'a Headers, name: &str) -> Vec<&'a str> {
        h.iter()
            .filter(|(n, _)| n.as_ref() == name.as_bytes())
            .map(|(_, v)| std::str::from_utf8(v).unwrap_or("<bin>"))
            .collect()
    }

    fn ctx(host: &str) -> ForwardCtx<'_> {
        ForwardCtx {
            client_ip: "203.0.113.7".parse().unwrap_or(IpAddr::from([0, 0, 0, 0])),
            proto: "https",
            host,
            upgrade: false,
        }
    }

    fn map(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut m = HeaderMap::new();
        for (n, v) in pairs {
            m.append(HeaderName::from_static(n), HeaderValue::from_static(v));
        }
        m
    }

    #[test]
    fn adds_forwarding_headers() {
        let h = request_headers(&map(&[("accept", "*/*")]), &ctx("Example.com:8443"));
        assert_eq!(get(&h, "host"), ["Example.com:8443"]);
        assert_eq!(get(&h, "x-forwarded-for"), ["203.0.113.7"]);
        assert_eq!(get(&h, "x-forwarded-proto"), ["https"]);
        assert_eq!(get(&h, "x-forwarded-host"), ["Example.com:8443"]);
        assert_eq!(get(&h, "via"), ["1.1 meridian"]);
        assert_eq!(
            get(&h, "forwarded"),
            ["for=203.0.113.7;host=\"Example.com:8443\";proto=https"]
        );
        assert_eq!(get(&h, "accept"), ["*/*"]);
        let id = get(&h, "x-request-id");
        assert_eq!(id.len(), 1);
        assert_eq!(id[0].len(), 32);
        assert!(id[0].bytes().all(|b| b.is_ascii_hexdigit()));
    }

    #[test]
    fn appends_to_existing_chain_and_keeps_request_id() {
        let src = map(&[
            ("x-forwarded-for", "198.51.100.1"),
            ("x-forwarded-for", "10.0.0.1"),
            ("via", "1.0 corp"),
            ("x-request-id", "abc-123"),
            ("x-forwarded-proto", "ftp"),
        ]);
        let h = request_headers(&src, &ctx("h"));
        assert_eq!(
            get(&h, "x-forwarded-for"),
            ["198.51.100.1, 10.0.0.1, 203.0.113.7"]
        );
        assert_eq!(get(&h, "via"), ["1.0 corp, 1.1 meridian"]);
        assert_eq!(get(&h, "x-request-id"), ["abc-123"]);
        assert_eq!(get(&h, "x-forwarded-proto"), ["https"]);
    }

    #[test]
    fn strips_hop_by_hop_and_connection_listed() {
        let src = map(&[
            ("connection", "keep-alive, x-secret"),
            ("keep-alive", "timeout=5"),
            ("x-secret", "1"),
            ("transfer-encoding", "chunked"),
            ("te", "gzip"),
            ("upgrade", "websocket"),
            ("proxy-authorization", "Basic x"),
            ("x-keep", "yes"),
        ]);
        let h = request_headers(&src, &ctx("h"));
        for gone in [
            "connection",
            "keep-alive",
            "x-secret",
            "transfer-encoding",
            "te",
            "upgrade",
            "proxy-authorization",
        ] {
            assert!(get(&h, gone).is_empty(), "{gone} leaked");
        }
        assert_eq!(get(&h, "x-keep"), ["yes"]);
    }

    #[test]
    fn keeps_te_trailers_and_upgrade_pair() {
        let src = map(&[
            ("te", "trailers"),
            ("connection", "Upgrade"),
            ("upgrade", "websocket"),
        ]);
        assert!(wants_upgrade(&src));
        let mut c = ctx("h");
        c.upgrade = true;
        let h = request_headers(&src, &c);
        assert_eq!(get(&h, "te"), ["trailers"]);
        assert_eq!(get(&h, "upgrade"), ["websocket"]);
        assert_eq!(get(&h, "connection"), ["upgrade"]);
    }

    #[test]
    fn ipv6_forwarded_is_quoted() {
        let mut c = ctx("h");
        c.client_ip = "2001:db8::1".parse().unwrap_or(c.client_ip);
        let h = request_headers(&HeaderMap::new(), &c);
        assert_eq!(
            get(&h, "forwarded"),
            ["for=\"[2001:db8::1]\";host=\"h\";proto=https"]
        );
        assert_eq!(get(&h, "x-forwarded-for"), ["2001:db8::1"]);
    }

    #[test]
    fn long_request_id_is_replaced() {
        let long = "x".repeat(500);
        let mut m = HeaderMap::new();
        m.insert(
            "x-request-id",
            HeaderValue::from_str(&long).unwrap_or(HeaderValue::from_static("")),
        );
        assert_eq!(request_id(&m).len(), 32);
    }

    #[test]
    fn response_headers_filtered() {
        let src: Headers = vec![
            (
                Bytes::from_static(b"content-type"),
                Bytes::from_static(b"text/plain"),
            ),
            (
                Bytes::from_static(b"transfer-encoding"),
                Bytes::from_static(b"chunked"),
            ),
            (
                Bytes::from_static(b"connection"),
                Bytes::from_static(b"close"),
            ),
            (Bytes::from_static(b"bad name"), Bytes::from_static(b"x")),
            (
                Bytes::from_static(b"x-bad-value"),
                Bytes::from_static(b"a\r\nb"),
            ),
            (
                Bytes::from_static(b"set-cookie"),
                Bytes::from_static(b"a=1"),
            ),
            (
                Bytes::from_static(b"set-cookie"),
                Bytes::from_static(b"b=2"),
            ),
        ];
        let m = response_headers(&src, false);
        assert_eq!(m.len(), 3);
        assert_eq!(m.get_all("set-cookie").iter().count(), 2);
        assert!(m.get("connection").is_none());

        let up: Headers = vec![
            (
                Bytes::from_static(b"upgrade"),
                Bytes::from_static(b"websocket"),
            ),
            (
                Bytes::from_static(b"connection"),
                Bytes::from_static(b"Upgrade"),
            ),
            (
                Bytes::from_static(b"sec-websocket-accept"),
                Bytes::from_static(b"abc"),
            ),
        ];
        let m = response_headers(&up, true);
        assert_eq!(
            m.get("upgrade").map(|v| v.as_bytes()),
            Some(&b"websocket"[..])
        );
        assert_eq!(
            m.get("connection").map(|v| v.as_bytes()),
            Some(&b"upgrade"[..])
        );
        assert!(m.get("sec-websocket-accept").is_some());
    }

    #[test]
    fn stamps_region_and_edge() {
        let mut m = HeaderMap::new();
        m.insert("meridian-region", HeaderValue::from_static("spoofed"));
        stamp_response(
            &mut m,
            &HeaderValue::from_static("eu"),
            &HeaderValue::from_static("edge-1"),
        );
        assert_eq!(
            m.get("meridian-region").map(|v| v.as_bytes()),
            Some(&b"eu"[..])
        );
        assert_eq!(
            m.get("meridian-edge").map(|v| v.as_bytes()),
            Some(&b"edge-1"[..])
        );
    }

    #[test]
    fn base64_matches_rfc_4648() {
        for (input, want) in [
            (&b""[..], ""),
            (b"f", "Zg=="),
            (b"fo", "Zm8="),
            (b"foo", "Zm9v"),
            (b"foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(input), want);
        }
        assert_eq!(base64(&[0xff; 16]).len(), 24);
    }

    #[test]
    fn extended_connect_maps_to_a_websocket_handshake_and_back() {
        let mut m = map(&[("sec-websocket-version", "13")]);
        extended_connect_as_upgrade(&mut m);
        assert!(wants_upgrade(&m));
        assert_eq!(m["upgrade"], "websocket");
        assert_eq!(m["sec-websocket-key"].len(), 24);
        let mut resp = map(&[
            ("upgrade", "websocket"),
            ("connection", "upgrade"),
            ("sec-websocket-accept", "x"),
            ("sec-websocket-protocol", "chat"),
        ]);
        upgrade_as_extended_connect(&mut resp);
        assert_eq!(resp.len(), 1);
        assert_eq!(resp["sec-websocket-protocol"], "chat");
    }
}
