//! Host + path-prefix routing, sans-IO.
//!
//! A [`RouteTable`] is built once per snapshot and never mutated: the request path reads it through
//! an `ArcSwap`, so a config push never blocks a request (the fly-proxy lesson).

use std::collections::HashMap;
use std::sync::Arc;

use coordinator_api::Mount;
use http::header::{HeaderName, HeaderValue};

/// One mount, normalised for matching.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Route {
    /// Without a trailing `/`, except the root mount which is exactly `/`.
    prefix: String,
    service: Arc<str>,
    strip: bool,
    opts: Arc<RouteOpts>,
}

/// A mount's per-route settings, parsed once per snapshot so requests only read them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RouteOpts {
    /// Weighted split between services; `None`: everything to the mount's service.
    pub splits: Option<Splits>,
    pub headers: HeaderEdits,
    /// Request body limit for this route (bytes); `None`: the edge-wide limit.
    pub max_body: Option<u64>,
    /// Identical concurrent credential-less GET/HEAD requests share one origin request.
    pub coalesce: bool,
}

/// Header edits in wire form; removals apply before sets.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HeaderEdits {
    pub request_set: Vec<(HeaderName, HeaderValue)>,
    pub request_remove: Vec<HeaderName>,
    pub response_set: Vec<(HeaderName, HeaderValue)>,
    pub response_remove: Vec<HeaderName>,
}

impl HeaderEdits {
    fn from_api(h: &coordinator_api::HeaderEdits) -> Self {
        let sets = |v: &[coordinator_api::HeaderSet]| {
            v.iter()
                .filter_map(|s| {
                    Some((
                        HeaderName::from_bytes(s.name.as_bytes()).ok()?,
                        HeaderValue::from_str(&s.value).ok()?,
                    ))
                })
                .collect()
        };
        let names = |v: &[String]| {
            v.iter()
                .filter_map(|n| HeaderName::from_bytes(n.as_bytes()).ok())
                .collect()
        };
        Self {
            request_set: sets(&h.request_set),
            request_remove: names(&h.request_remove),
            response_set: sets(&h.response_set),
            response_remove: names(&h.response_remove),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.request_set.is_empty()
            && self.request_remove.is_empty()
            && self.response_set.is_empty()
            && self.response_remove.is_empty()
    }

    /// Applies the response edits to a response about to go to the client.
    pub fn apply_response(&self, map: &mut http::HeaderMap) {
        for n in &self.response_remove {
            map.remove(n);
        }
        for (n, v) in &self.response_set {
            map.insert(n.clone(), v.clone());
        }
    }

    /// Applies the request edits to the header list bound for the origin.
    pub fn apply_request(&self, headers: &mut tunnel_proto::Headers) {
        if self.request_remove.is_empty() && self.request_set.is_empty() {
            return;
        }
        headers.retain(|(n, _)| {
            !self
                .request_remove
                .iter()
                .chain(self.request_set.iter().map(|(s, _)| s))
                .any(|r| r.as_str().as_bytes() == n.as_ref())
        });
        for (n, v) in &self.request_set {
            headers.push((
                bytes::Bytes::copy_from_slice(n.as_str().as_bytes()),
                bytes::Bytes::copy_from_slice(v.as_bytes()),
            ));
        }
    }
}

/// A weighted choice between services, sans-IO: the caller supplies the random draw.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Splits {
    /// (service, cumulative weight up to and including it); zero weights are left out.
    targets: Vec<(Arc<str>, u64)>,
    total: u64,
}

impl Splits {
    /// `None` when no target has a weight (the mount's own service then takes everything).
    pub fn new(splits: &[coordinator_api::Split]) -> Option<Self> {
        let mut total = 0u64;
        let mut targets = Vec::with_capacity(splits.len());
        for s in splits.iter().filter(|s| s.weight > 0) {
            total += u64::from(s.weight);
            targets.push((Arc::from(s.service.as_str()), total));
        }
        (total > 0).then_some(Self { targets, total })
    }

    /// Sum of the weights: draws are taken in `0..total()`.
    pub fn total(&self) -> u64 {
        self.total
    }

    /// The service for a draw `r` (taken modulo the total, so any `u64` is fine).
    pub fn pick(&self, r: u64) -> &Arc<str> {
        let r = r % self.total;
        let i = self.targets.partition_point(|(_, upto)| *upto <= r);
        // `r < total` = the last cumulative weight, so `i` is in range.
        &self.targets[i.min(self.targets.len() - 1)].0
    }
}

/// The outcome of a successful lookup.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RouteMatch {
    pub service: Arc<str>,
    /// Origin-form path and query to send upstream (prefix removed when the mount says so).
    pub path_and_query: String,
    /// The mount's per-route settings.
    pub opts: Arc<RouteOpts>,
}

/// Immutable host → prefixes map.
#[derive(Debug, Default)]
pub struct RouteTable {
    /// Routes per host, longest prefix first.
    hosts: HashMap<String, Vec<Route>>,
}

impl RouteTable {
    pub fn from_mounts(mounts: &[Mount]) -> Self {
        let mut hosts: HashMap<String, Vec<Route>> = HashMap::new();
        for m in mounts {
            let Some(host) = normalize_host(&m.host) else {
                continue;
            };
            let prefix = normalize_prefix(&m.path_prefix);
            let routes = hosts.entry(host).or_default();
            // First mount for an identical (host, prefix) wins, so the outcome is deterministic.
            // Passthrough mounts are L4 (by SNI, see `passthrough`), not HTTP routes.
            if m.passthrough || routes.iter().any(|r| r.prefix == prefix) {
                continue;
            }
            routes.push(Route {
                prefix,
                service: Arc::from(m.service.as_str()),
                strip: m.strip_prefix,
                opts: Arc::new(RouteOpts {
                    splits: Splits::new(&m.splits),
                    headers: HeaderEdits::from_api(&m.headers),
                    max_body: m.max_body_bytes,
                    coalesce: m.coalesce,
                }),
            });
        }
        for routes in hosts.values_mut() {
            routes.sort_by_key(|r| std::cmp::Reverse(r.prefix.len()));
        }
        Self { hosts }
    }

    /// Whether any mount exists for `host` (already normalised).
    pub fn serves_host(&self, host: &str) -> bool {
        self.hosts.contains_key(host)
    }

    /// Looks up a normalised host and an origin-form `path[?query]`; a split mount picks its
    /// service at random by weight.
    pub fn route(&self, host: &str, path_and_query: &str) -> Option<RouteMatch> {
        self.route_with(host, path_and_query, rand::random())
    }

    /// [`RouteTable::route`] with the split draw given (deterministic, for tests).
    pub fn route_with(&self, host: &str, path_and_query: &str, draw: u64) -> Option<RouteMatch> {
        let routes = self.hosts.get(host)?;
        let (path, query) = match path_and_query.find('?') {
            Some(i) => (&path_and_query[..i], Some(&path_and_query[i + 1..])),
            None => (path_and_query, None),
        };
        if !path.starts_with('/') {
            return None;
        }
        let route = routes.iter().find(|r| prefix_matches(&r.prefix, path))?;
        let mut out = String::with_capacity(path_and_query.len());
        if route.strip && route.prefix != "/" {
            let rest = &path[route.prefix.len()..];
            if !rest.starts_with('/') {
                out.push('/');
            }
            out.push_str(rest);
        } else {
            out.push_str(path);
        }
        if let Some(q) = query {
            out.push('?');
            out.push_str(q);
        }
        let service = match &route.opts.splits {
            Some(splits) => splits.pick(draw).clone(),
            None => route.service.clone(),
        };
        Some(RouteMatch {
            service,
            path_and_query: out,
            opts: route.opts.clone(),
        })
    }
}

/// `prefix` matches `path` on whole segments: `/demo` matches `/demo`, `/demo/`, `/demo/x`, not `/demox`.
fn prefix_matches(prefix: &str, path: &str) -> bool {
    if prefix == "/" {
        return true;
    }
    match path.strip_prefix(prefix) {
        Some(rest) => rest.is_empty() || rest.starts_with('/'),
        None => false,
    }
}

fn normalize_prefix(p: &str) -> String {
    let trimmed = p.trim_end_matches('/');
    if trimmed.is_empty() {
        "/".to_owned()
    } else if trimmed.starts_with('/') {
        trimmed.to_owned()
    } else {
        format!("/{trimmed}")
    }
}

/// Lower-cases a Host / :authority value and strips the port, userinfo and a trailing dot.
/// `None` for an empty or syntactically impossible host.
pub fn normalize_host(authority: &str) -> Option<String> {
    let a = authority.trim();
    let a = a.rsplit_once('@').map_or(a, |(_, h)| h);
    let host = if let Some(rest) = a.strip_prefix('[') {
        // IPv6 literal: `[::1]:8080` → `[::1]`.
        let end = rest.find(']')?;
        &a[..end + 2]
    } else {
        match a.rsplit_once(':') {
            Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) => h,
            Some(_) => return None,
            None => a,
        }
    };
    let host = host.strip_suffix('.').unwrap_or(host);
    if host.is_empty()
        || host.len() > 255
        || !host.bytes().all(|b| {
            b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'[' | b']' | b':')
        })
    {
        return None;
    }
    Some(host.to_ascii_lowercase())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mount(host: &str, prefix: &str, service: &str, strip: bool) -> Mount {
        Mount {
            host: host.into(),
            path_prefix: prefix.into(),
            service: service.into(),
            strip_prefix: strip,
            ..Default::default()
        }
    }

    fn table() -> RouteTable {
        RouteTable::from_mounts(&[
            mount("example.com", "/", "root", false),
            mount("example.com", "/demo", "demo", true),
            mount("example.com", "/demo/api/", "api", false),
            mount("other.test", "/only", "only", false),
        ])
    }

    fn svc(t: &RouteTable, host: &str, path: &str) -> Option<(String, String)> {
        t.route(host, path)
            .map(|m| (m.service.to_string(), m.path_and_query))
    }

    #[test]
    fn longest_prefix_wins() {
        let t = table();
        assert_eq!(
            svc(&t, "example.com", "/demo/api/v1"),
            Some(("api".into(), "/demo/api/v1".into()))
        );
        assert_eq!(
            svc(&t, "example.com", "/demo/apix"),
            Some(("demo".into(), "/apix".into()))
        );
        assert_eq!(
            svc(&t, "example.com", "/else"),
            Some(("root".into(), "/else".into()))
        );
    }

    #[test]
    fn whole_segments_only() {
        let t = table();
        assert_eq!(
            svc(&t, "example.com", "/demo").map(|s| s.0),
            Some("demo".into())
        );
        assert_eq!(
            svc(&t, "example.com", "/demo/").map(|s| s.0),
            Some("demo".into())
        );
        assert_eq!(
            svc(&t, "example.com", "/demo/x").map(|s| s.0),
            Some("demo".into())
        );
        assert_eq!(
            svc(&t, "example.com", "/demox").map(|s| s.0),
            Some("root".into())
        );
        assert_eq!(svc(&t, "other.test", "/onlyx"), None);
        assert_eq!(svc(&t, "other.test", "/"), None);
    }

    #[test]
    fn strip_keeps_leading_slash_and_query() {
        let t = table();
        assert_eq!(
            svc(&t, "example.com", "/demo").map(|s| s.1),
            Some("/".into())
        );
        assert_eq!(
            svc(&t, "example.com", "/demo/").map(|s| s.1),
            Some("/".into())
        );
        assert_eq!(
            svc(&t, "example.com", "/demo?a=1&b=/demo").map(|s| s.1),
            Some("/?a=1&b=/demo".into())
        );
        assert_eq!(
            svc(&t, "example.com", "/demo/x/y?q").map(|s| s.1),
            Some("/x/y?q".into())
        );
        // Root mount without strip keeps the query too.
        assert_eq!(
            svc(&t, "example.com", "/r?z=9").map(|s| s.1),
            Some("/r?z=9".into())
        );
    }

    #[test]
    fn unknown_host_or_bad_path() {
        let t = table();
        assert_eq!(svc(&t, "nope.test", "/"), None);
        assert_eq!(svc(&t, "example.com", "*"), None);
        assert!(t.serves_host("example.com"));
        assert!(!t.serves_host("nope.test"));
    }

    #[test]
    fn host_normalisation() {
        assert_eq!(
            normalize_host("Example.COM:8080").as_deref(),
            Some("example.com")
        );
        assert_eq!(
            normalize_host("example.com.").as_deref(),
            Some("example.com")
        );
        assert_eq!(
            normalize_host("user@example.com:1").as_deref(),
            Some("example.com")
        );
        assert_eq!(normalize_host("[::1]:443").as_deref(), Some("[::1]"));
        assert_eq!(normalize_host("127.0.0.1:80").as_deref(), Some("127.0.0.1"));
        assert_eq!(normalize_host(""), None);
        assert_eq!(normalize_host("bad host"), None);
        assert_eq!(normalize_host("a:b"), None);
        let t = RouteTable::from_mounts(&[mount("Edge.Test", "/", "s", false)]);
        let host = normalize_host("EDGE.test:443").unwrap_or_default();
        assert_eq!(svc(&t, &host, "/x").map(|s| s.0), Some("s".into()));
    }

    #[test]
    fn first_duplicate_mount_wins() {
        let t = RouteTable::from_mounts(&[
            mount("h", "/a/", "first", false),
            mount("h", "/a", "second", false),
        ]);
        assert_eq!(svc(&t, "h", "/a/b").map(|s| s.0), Some("first".into()));
    }

    fn split(service: &str, weight: u32) -> coordinator_api::Split {
        coordinator_api::Split {
            service: service.into(),
            weight,
        }
    }

    #[test]
    fn splits_pick_by_weight() {
        let s = Splits::new(&[split("a", 95), split("off", 0), split("b", 5)])
            .unwrap_or_else(|| panic!("weights"));
        assert_eq!(s.total(), 100);
        let mut a = 0;
        for r in 0..100u64 {
            match &**s.pick(r) {
                "a" => a += 1,
                "b" => {}
                other => panic!("picked {other}"),
            }
        }
        assert_eq!(a, 95, "exactly the weight over one full cycle of draws");
        assert_eq!(&**s.pick(94), "a");
        assert_eq!(&**s.pick(95), "b");
        assert_eq!(&**s.pick(u64::MAX), &**s.pick(u64::MAX % 100));
        assert!(Splits::new(&[split("a", 0)]).is_none());
        assert!(Splits::new(&[]).is_none());
        let only = Splits::new(&[split("a", 0), split("b", 1)]).unwrap_or_else(|| panic!());
        assert!((0..10).all(|r| &**only.pick(r) == "b"));
    }

    #[test]
    fn split_mount_routes_by_draw_and_keeps_options() {
        let m = Mount {
            splits: vec![split("blue", 1), split("green", 3)],
            coalesce: true,
            max_body_bytes: Some(10),
            ..mount("h", "/", "blue", false)
        };
        let t = RouteTable::from_mounts(&[m]);
        let got: Vec<String> = (0..4)
            .filter_map(|r| t.route_with("h", "/x", r))
            .map(|m| m.service.to_string())
            .collect();
        assert_eq!(got, ["blue", "green", "green", "green"]);
        let m = t.route("h", "/").unwrap_or_else(|| panic!("route"));
        assert!(m.opts.coalesce);
        assert_eq!(m.opts.max_body, Some(10));
    }

    #[test]
    fn header_edits_apply_in_order() {
        let api = coordinator_api::HeaderEdits {
            request_set: vec![coordinator_api::HeaderSet {
                name: "x-env".into(),
                value: "prod".into(),
            }],
            request_remove: vec!["cookie".into()],
            response_set: vec![coordinator_api::HeaderSet {
                name: "x-frame-options".into(),
                value: "DENY".into(),
            }],
            response_remove: vec!["server".into()],
        };
        let e = HeaderEdits::from_api(&api);
        let b = |s: &'static str| bytes::Bytes::from_static(s.as_bytes());
        let mut req = vec![
            (b("cookie"), b("a=1")),
            (b("x-env"), b("dev")),
            (b("accept"), b("*/*")),
        ];
        e.apply_request(&mut req);
        assert_eq!(req, vec![(b("accept"), b("*/*")), (b("x-env"), b("prod"))]);
        let mut resp = http::HeaderMap::new();
        resp.insert("server", HeaderValue::from_static("nginx"));
        e.apply_response(&mut resp);
        assert!(resp.get("server").is_none());
        assert_eq!(resp["x-frame-options"], "DENY");
    }

    #[test]
    fn passthrough_mounts_are_not_http_routes() {
        let t = RouteTable::from_mounts(&[Mount {
            passthrough: true,
            ..mount("tls.test", "/", "raw", false)
        }]);
        assert!(t.route("tls.test", "/").is_none());
    }
}
