//! Host + path-prefix routing, sans-IO.
//!
//! A [`RouteTable`] is built once per snapshot and never mutated: the request path reads it through
//! an `ArcSwap`, so a config push never blocks a request (the fly-proxy lesson).

use std::collections::HashMap;
use std::sync::Arc;

use coordinator_api::Mount;

/// One mount, normalised for matching.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Route {
    /// Without a trailing `/`, except the root mount which is exactly `/`.
    prefix: String,
    service: Arc<str>,
    strip: bool,
}

/// The outcome of a successful lookup.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RouteMatch {
    pub service: Arc<str>,
    /// Origin-form path and query to send upstream (prefix removed when the mount says so).
    pub path_and_query: String,
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
            if routes.iter().any(|r| r.prefix == prefix) {
                continue;
            }
            routes.push(Route {
                prefix,
                service: Arc::from(m.service.as_str()),
                strip: m.strip_prefix,
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

    /// Looks up a normalised host and an origin-form `path[?query]`.
    pub fn route(&self, host: &str, path_and_query: &str) -> Option<RouteMatch> {
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
        Some(RouteMatch {
            service: route.service.clone(),
            path_and_query: out,
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
}
