//! Input validation and normalisation for the admin API; pure, so every rule is unit tested.
//!
//! Errors name the request field at fault so `meridian ctl` can point at it.

use axum::http::Uri;
use coordinator_api::{ApiError, Mount, Service};

/// Longest path prefix we accept; a prefix is a routing key, not a URL.
const MAX_PATH_PREFIX: usize = 1024;
/// Longest edge or agent id accepted in a heartbeat.
pub(crate) const MAX_ID_LEN: usize = 128;

/// A validation failure: the message and the field it concerns.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Invalid {
    pub(crate) field: &'static str,
    pub(crate) message: String,
}

impl Invalid {
    fn new(field: &'static str, message: impl Into<String>) -> Self {
        Self {
            field,
            message: message.into(),
        }
    }
}

impl From<Invalid> for ApiError {
    fn from(e: Invalid) -> Self {
        Self {
            error: e.message,
            field: Some(e.field.to_owned()),
        }
    }
}

/// Longest free-text description accepted (API tokens).
const MAX_DESCRIPTION: usize = 200;

/// Free text for humans: bounded, printable, single line.
pub(crate) fn description(field: &'static str, value: &str) -> Result<(), Invalid> {
    if value.len() > MAX_DESCRIPTION {
        return Err(Invalid::new(
            field,
            format!("{field} must be at most {MAX_DESCRIPTION} bytes"),
        ));
    }
    if value.chars().any(char::is_control) {
        return Err(Invalid::new(
            field,
            format!("{field} must not contain control characters"),
        ));
    }
    Ok(())
}

/// Names of services and regions: `[a-z0-9-]{1,63}`, so they are safe in DNS labels, URLs and logs.
pub(crate) fn name(field: &'static str, value: &str) -> Result<(), Invalid> {
    if value.is_empty() || value.len() > 63 {
        return Err(Invalid::new(
            field,
            format!("{field} must be 1 to 63 characters long"),
        ));
    }
    if let Some(c) = value
        .chars()
        .find(|c| !matches!(c, 'a'..='z' | '0'..='9' | '-'))
    {
        return Err(Invalid::new(
            field,
            format!("{field} may contain only a-z, 0-9 and '-' (found {c:?})"),
        ));
    }
    Ok(())
}

/// A mount host: lower-cased, port and trailing dot removed, then checked as a DNS name.
pub(crate) fn host(value: &str) -> Result<String, Invalid> {
    const F: &str = "host";
    let mut h = value.trim().to_ascii_lowercase();
    if h.starts_with('[') {
        return Err(Invalid::new(
            F,
            "host must be a DNS name, not an IPv6 literal",
        ));
    }
    if let Some((name, port)) = h.rsplit_once(':') {
        if port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) || port.len() > 5 {
            return Err(Invalid::new(
                F,
                format!("host {value:?} has an invalid port"),
            ));
        }
        h = name.to_owned();
    }
    if let Some(stripped) = h.strip_suffix('.') {
        h = stripped.to_owned();
    }
    if h.is_empty() || h.len() > 253 {
        return Err(Invalid::new(F, "host must be 1 to 253 characters long"));
    }
    for label in h.split('.') {
        if label.is_empty() || label.len() > 63 {
            return Err(Invalid::new(
                F,
                format!("host {value:?}: each label must be 1 to 63 characters"),
            ));
        }
        if !label
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        {
            return Err(Invalid::new(
                F,
                format!("host {value:?}: labels may contain only a-z, 0-9 and '-'"),
            ));
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err(Invalid::new(
                F,
                format!("host {value:?}: labels may not start or end with '-'"),
            ));
        }
    }
    Ok(h)
}

/// A path prefix: starts with '/', no `..`, `?`, `#`, whitespace or control characters; a
/// trailing '/' is dropped (except for "/") so `/api/` and `/api` are the same mount.
pub(crate) fn path_prefix(value: &str) -> Result<String, Invalid> {
    const F: &str = "path_prefix";
    if !value.starts_with('/') {
        return Err(Invalid::new(F, "path_prefix must start with '/'"));
    }
    if value.len() > MAX_PATH_PREFIX {
        return Err(Invalid::new(
            F,
            format!("path_prefix longer than {MAX_PATH_PREFIX} bytes"),
        ));
    }
    if value.contains("..") {
        return Err(Invalid::new(F, "path_prefix may not contain '..'"));
    }
    if let Some(c) = value
        .chars()
        .find(|c| matches!(c, '?' | '#') || c.is_whitespace() || c.is_control())
    {
        return Err(Invalid::new(
            F,
            format!("path_prefix may not contain {c:?}"),
        ));
    }
    if value.contains("//") {
        return Err(Invalid::new(
            F,
            "path_prefix may not contain an empty segment ('//')",
        ));
    }
    let normalised = if value.len() > 1 {
        value.strip_suffix('/').unwrap_or(value)
    } else {
        value
    };
    Ok(normalised.to_owned())
}

/// Validates and normalises a mount's host and path prefix (service existence is the store's job).
pub(crate) fn mount(m: &Mount) -> Result<Mount, Invalid> {
    let host = host(&m.host)?;
    let path_prefix = path_prefix(&m.path_prefix)?;
    name("service", &m.service)?;
    route_options(m, &path_prefix)?;
    Ok(Mount {
        host,
        path_prefix,
        ..m.clone()
    })
}

/// Most split targets on one mount, and header edits per list.
const MAX_SPLITS: usize = 16;
const MAX_HEADER_EDITS: usize = 32;
/// Largest split weight.
const MAX_SPLIT_WEIGHT: u32 = 10_000;
/// Longest header value a route may set.
const MAX_HEADER_VALUE: usize = 1024;

/// The first service a mount's splits name that `exists` does not know: checked by both store
/// backends inside the write, so a split can never point at a missing service (an edge would
/// answer 503 for its share of the traffic).
pub(crate) fn missing_split_target<E>(
    m: &Mount,
    mut exists: impl FnMut(&str) -> Result<bool, E>,
) -> Result<Option<String>, E> {
    for sp in &m.splits {
        if !exists(&sp.service)? {
            return Ok(Some(sp.service.clone()));
        }
    }
    Ok(None)
}

/// The field error for [`missing_split_target`]'s answer.
pub(crate) fn unknown_split_target(service: &str) -> (&'static str, String) {
    (
        "splits",
        format!("split target service {service:?} does not exist; create it first"),
    )
}

/// Mounts that send `service` a share of their traffic as a split target (beyond those whose
/// main service it is): deleting the service is refused while there are any.
pub(crate) fn split_users<'a>(mounts: &'a [Mount], service: &str) -> Vec<&'a Mount> {
    mounts
        .iter()
        .filter(|m| m.service != service && m.splits.iter().any(|sp| sp.service == service))
        .collect()
}

/// The refusal of a service delete while splits use it.
pub(crate) fn in_use_by_splits(service: &str, users: &[&Mount]) -> String {
    let first = users
        .first()
        .map(|m| format!("{}{}", m.host, m.path_prefix))
        .unwrap_or_default();
    format!(
        "service {service:?} is still a split target of {} mount(s) (e.g. {first}); remove it from their splits first",
        users.len()
    )
}

/// Splits, header edits and L4 flags of a mount: checked here so an edge never has to reject one.
fn route_options(m: &Mount, path_prefix: &str) -> Result<(), Invalid> {
    if m.splits.len() > MAX_SPLITS {
        return Err(Invalid::new(
            "splits",
            format!("at most {MAX_SPLITS} split targets"),
        ));
    }
    for (i, sp) in m.splits.iter().enumerate() {
        name("splits", &sp.service)?;
        if sp.weight > MAX_SPLIT_WEIGHT {
            return Err(Invalid::new(
                "splits",
                format!("split weight must be at most {MAX_SPLIT_WEIGHT}"),
            ));
        }
        if m.splits[..i].iter().any(|o| o.service == sp.service) {
            return Err(Invalid::new(
                "splits",
                format!("service {:?} is listed twice", sp.service),
            ));
        }
    }
    if !m.splits.is_empty() && m.splits.iter().all(|sp| sp.weight == 0) {
        return Err(Invalid::new(
            "splits",
            "at least one split needs a weight above 0",
        ));
    }
    let h = &m.headers;
    for (field, sets) in [
        ("headers.request_set", &h.request_set),
        ("headers.response_set", &h.response_set),
    ] {
        if sets.len() > MAX_HEADER_EDITS {
            return Err(Invalid::new(field, format!("at most {MAX_HEADER_EDITS}")));
        }
        for set in sets {
            header_name(field, &set.name)?;
            if set.value.len() > MAX_HEADER_VALUE
                || set
                    .value
                    .bytes()
                    .any(|b| (b < 0x20 && b != b'\t') || b == 0x7f)
            {
                return Err(Invalid::new(
                    field,
                    format!(
                        "value of {:?} must be printable and at most {MAX_HEADER_VALUE} bytes",
                        set.name
                    ),
                ));
            }
        }
    }
    for (field, names) in [
        ("headers.request_remove", &h.request_remove),
        ("headers.response_remove", &h.response_remove),
    ] {
        if names.len() > MAX_HEADER_EDITS {
            return Err(Invalid::new(field, format!("at most {MAX_HEADER_EDITS}")));
        }
        for n in names {
            header_name(field, n)?;
        }
    }
    if m.max_body_bytes == Some(0) {
        return Err(Invalid::new("max_body_bytes", "must be above 0 when set"));
    }
    if m.passthrough && path_prefix != "/" {
        return Err(Invalid::new(
            "passthrough",
            "a TLS passthrough mount routes a whole host: path_prefix must be /",
        ));
    }
    if m.passthrough && !m.splits.is_empty() {
        return Err(Invalid::new(
            "passthrough",
            "a TLS passthrough mount cannot split traffic",
        ));
    }
    if m.proxy_protocol && !m.passthrough {
        return Err(Invalid::new(
            "proxy_protocol",
            "the PROXY protocol header is sent on passthrough mounts only",
        ));
    }
    Ok(())
}

/// An HTTP field name (RFC 9110 token), 1 to 128 characters.
fn header_name(field: &'static str, n: &str) -> Result<(), Invalid> {
    let ok = !n.is_empty()
        && n.len() <= 128
        && n.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(Invalid::new(field, format!("{n:?} is not a header name")))
    }
}

/// Most direct origins one service may list.
const MAX_ORIGINS: usize = 64;
/// Largest origin weight (weighted round robin).
const MAX_WEIGHT: u32 = 1_000;
/// Longest origin URL or CA path.
const MAX_ORIGIN_TEXT: usize = 512;

/// A service and its backend settings: origins are `http(s)://host[:port]` without a path,
/// thresholds and intervals are within sane bounds, so an edge never has to reject it.
pub(crate) fn service(s: &Service) -> Result<Service, Invalid> {
    name("name", &s.name)?;
    let mut out = s.clone();
    if s.origins.len() > MAX_ORIGINS {
        return Err(Invalid::new(
            "origins",
            format!("at most {MAX_ORIGINS} origins per service"),
        ));
    }
    for (o, norm) in s.origins.iter().zip(out.origins.iter_mut()) {
        norm.url = origin_url(&o.url)?;
        if let Some(w) = o.weight
            && !(1..=MAX_WEIGHT).contains(&w)
        {
            return Err(Invalid::new(
                "origins.weight",
                format!("weight must be 1 to {MAX_WEIGHT}"),
            ));
        }
        if let Some(ca) = &o.ca {
            if ca.is_empty() || ca.len() > MAX_ORIGIN_TEXT || ca.chars().any(char::is_control) {
                return Err(Invalid::new(
                    "origins.ca",
                    "ca must be a file path on the edge or \"system\"",
                ));
            }
            if norm.url.starts_with("http://") {
                return Err(Invalid::new(
                    "origins.ca",
                    format!("{}: a CA only applies to https origins", norm.url),
                ));
            }
        }
    }
    if let Some(st) = &s.sticky
        && (st.name.is_empty()
            || st.name.len() > 64
            || !st
                .name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b)))
    {
        return Err(Invalid::new(
            "sticky.name",
            "cookie name must be 1 to 64 characters of a-z, A-Z, 0-9, '-', '_', '.'",
        ));
    }
    if let Some(h) = &s.health_check {
        if !h.path.starts_with('/')
            || h.path.len() > MAX_PATH_PREFIX
            || h.path.chars().any(|c| c.is_whitespace() || c.is_control())
        {
            return Err(Invalid::new(
                "health_check.path",
                "path must start with '/' and contain no whitespace",
            ));
        }
        if !(100..=3_600_000).contains(&h.interval_ms) {
            return Err(Invalid::new(
                "health_check.interval_ms",
                "interval must be 100 ms to 1 h",
            ));
        }
        if h.timeout_ms < 10 || h.timeout_ms > h.interval_ms {
            return Err(Invalid::new(
                "health_check.timeout_ms",
                "timeout must be at least 10 ms and at most the interval",
            ));
        }
        if !(1..=100).contains(&h.rise) || !(1..=100).contains(&h.fall) {
            return Err(Invalid::new(
                "health_check.rise",
                "rise and fall must be 1 to 100",
            ));
        }
    }
    if let Some(b) = &s.circuit_breaker
        && (!(1..=1_000).contains(&b.failures)
            || !(10..=3_600_000).contains(&b.open_ms)
            || !(1..=1_000).contains(&b.half_open_probes))
    {
        return Err(Invalid::new(
            "circuit_breaker",
            "failures 1 to 1000, open_ms 10 ms to 1 h, half_open_probes 1 to 1000",
        ));
    }
    if let Some(c) = &s.concurrency {
        if c.soft == Some(0) || c.hard == Some(0) {
            return Err(Invalid::new("concurrency", "limits must be at least 1"));
        }
        if let (Some(soft), Some(hard)) = (c.soft, c.hard)
            && soft > hard
        {
            return Err(Invalid::new(
                "concurrency.soft",
                "the soft limit must not exceed the hard one",
            ));
        }
    }
    if let Some(b) = &s.retry_budget
        && (b.percent > 1_000 || b.min_per_sec > 10_000)
    {
        return Err(Invalid::new(
            "retry_budget",
            "percent 0 to 1000 (of requests), min_per_sec 0 to 10000",
        ));
    }
    Ok(out)
}

/// `http://host[:port]` or `https://host[:port]`, lower-cased, without a trailing '/'.
fn origin_url(value: &str) -> Result<String, Invalid> {
    const F: &str = "origins.url";
    if value.len() > MAX_ORIGIN_TEXT {
        return Err(Invalid::new(F, "origin URL too long"));
    }
    let uri: Uri = value
        .parse()
        .map_err(|e| Invalid::new(F, format!("origin URL {value:?}: {e}")))?;
    let scheme = match uri.scheme_str() {
        Some(s @ ("http" | "https")) => s,
        _ => {
            return Err(Invalid::new(
                F,
                format!("origin URL {value:?} must start with http:// or https://"),
            ));
        }
    };
    let Some(auth) = uri.authority() else {
        return Err(Invalid::new(F, format!("origin URL {value:?} has no host")));
    };
    if auth.as_str().contains('@') || auth.host().is_empty() {
        return Err(Invalid::new(
            F,
            format!("origin URL {value:?}: give host[:port] only (no user info)"),
        ));
    }
    if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
        return Err(Invalid::new(
            F,
            format!("origin URL {value:?} may not have a path or query (mounts choose paths)"),
        ));
    }
    Ok(format!("{scheme}://{}", auth.as_str().to_ascii_lowercase()))
}

/// Validates and normalises a GeoDNS zone record (conflicts with other records are the
/// store's job, checked at commit).
pub(crate) fn dns_record(
    r: &coordinator_api::DnsRecord,
) -> Result<coordinator_api::DnsRecord, Invalid> {
    r.normalized()
        .map_err(|(field, message)| Invalid::new(field, message))
}

/// Ids that edges report about themselves (edge id, region, agent ids): bounded, printable.
pub(crate) fn reported_id(field: &'static str, value: &str) -> Result<(), Invalid> {
    if value.is_empty() || value.len() > MAX_ID_LEN {
        return Err(Invalid::new(
            field,
            format!("{field} must be 1 to {MAX_ID_LEN} bytes long"),
        ));
    }
    if value.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err(Invalid::new(
            field,
            format!("{field} may not contain whitespace or control characters"),
        ));
    }
    Ok(())
}

/// Region coordinates, when given, must be on the globe.
pub(crate) fn coordinates(lat: Option<f64>, lon: Option<f64>) -> Result<(), Invalid> {
    if let Some(lat) = lat
        && !(-90.0..=90.0).contains(&lat)
    {
        return Err(Invalid::new("latitude", "latitude must be within -90..=90"));
    }
    if let Some(lon) = lon
        && !(-180.0..=180.0).contains(&lon)
    {
        return Err(Invalid::new(
            "longitude",
            "longitude must be within -180..=180",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mount_route_options() {
        use coordinator_api::{HeaderSet, Split};
        let base = Mount {
            host: "a.test".into(),
            path_prefix: "/".into(),
            service: "web".into(),
            ..Default::default()
        };
        let split = |s: &str, w| Split {
            service: s.into(),
            weight: w,
        };
        let ok = Mount {
            splits: vec![split("web", 95), split("canary", 5)],
            max_body_bytes: Some(10),
            coalesce: true,
            ..base.clone()
        };
        assert_eq!(mount(&ok).unwrap(), ok, "options survive validation");
        let bad = [
            Mount {
                splits: vec![split("web", 0), split("b", 0)],
                ..base.clone()
            },
            Mount {
                splits: vec![split("web", 1), split("web", 2)],
                ..base.clone()
            },
            Mount {
                splits: vec![split("Bad", 1)],
                ..base.clone()
            },
            Mount {
                max_body_bytes: Some(0),
                ..base.clone()
            },
            Mount {
                proxy_protocol: true,
                ..base.clone()
            },
            Mount {
                passthrough: true,
                path_prefix: "/x".into(),
                ..base.clone()
            },
        ];
        for m in bad {
            assert!(mount(&m).is_err(), "{m:?}");
        }
        let mut h = base.clone();
        h.headers.request_set.push(HeaderSet {
            name: "x-a".into(),
            value: "1".into(),
        });
        h.headers.response_remove.push("server".into());
        assert!(mount(&h).is_ok());
        h.headers.response_remove.push("bad name".into());
        assert!(mount(&h).is_err());
        let mut v = base.clone();
        v.headers.response_set.push(HeaderSet {
            name: "x-a".into(),
            value: "a\r\nb".into(),
        });
        assert!(mount(&v).is_err());
    }

    #[test]
    fn retry_budgets_are_bounded() {
        let mut s = Service {
            name: "web".into(),
            retry_budget: Some(coordinator_api::RetryBudget {
                percent: 20,
                min_per_sec: 3,
            }),
            ..Default::default()
        };
        assert!(service(&s).is_ok());
        s.retry_budget = Some(coordinator_api::RetryBudget {
            percent: 5_000,
            min_per_sec: 0,
        });
        assert_eq!(service(&s).unwrap_err().field, "retry_budget");
    }

    #[test]
    fn split_targets_and_users() {
        use coordinator_api::Split;
        let mut m: Mount = serde_json::from_value(serde_json::json!({
            "host": "a.test", "path_prefix": "/", "service": "web",
        }))
        .unwrap();
        m.splits = vec![
            Split {
                service: "web".into(),
                weight: 95,
            },
            Split {
                service: "canary".into(),
                weight: 5,
            },
        ];
        let known = |s: &str| Ok::<_, ()>(s == "web");
        assert_eq!(missing_split_target(&m, known), Ok(Some("canary".into())));
        assert_eq!(missing_split_target(&m, |_| Ok::<_, ()>(true)), Ok(None));
        let mounts = vec![m];
        assert_eq!(split_users(&mounts, "canary").len(), 1);
        assert!(
            split_users(&mounts, "web").is_empty(),
            "its own mount counts as a mount"
        );
        assert!(in_use_by_splits("canary", &split_users(&mounts, "canary")).contains("a.test/"));
    }

    #[test]
    fn names() {
        for ok in ["a", "web-1", "0", &"a".repeat(63)] {
            assert!(name("name", ok).is_ok(), "{ok}");
        }
        for bad in ["", "Web", "a_b", "a.b", "é", &"a".repeat(64)] {
            assert_eq!(name("name", bad).unwrap_err().field, "name", "{bad}");
        }
    }

    #[test]
    fn hosts() {
        assert_eq!(host("Edge.Meridian.Test").unwrap(), "edge.meridian.test");
        assert_eq!(host("a.test:8443").unwrap(), "a.test");
        assert_eq!(host("a.test.").unwrap(), "a.test");
        assert_eq!(host("127.0.0.1").unwrap(), "127.0.0.1");
        for bad in [
            "", "a..b", "-a.test", "a-.test", "a_b.test", "a.test:", "a.test:x", "[::1]:80", "a b",
            "*.x",
        ] {
            assert_eq!(host(bad).unwrap_err().field, "host", "{bad}");
        }
        assert!(host(&format!("{}.test", "a".repeat(64))).is_err());
    }

    #[test]
    fn path_prefixes() {
        assert_eq!(path_prefix("/").unwrap(), "/");
        assert_eq!(path_prefix("/api/").unwrap(), "/api");
        assert_eq!(path_prefix("/api/v1").unwrap(), "/api/v1");
        for bad in [
            "", "api", "/a/../b", "/a?b", "/a#b", "/a b", "/a//b", "/a\n",
        ] {
            assert_eq!(
                path_prefix(bad).unwrap_err().field,
                "path_prefix",
                "{bad:?}"
            );
        }
    }

    #[test]
    fn mounts_normalise() {
        let m = Mount {
            host: "A.Test:80".into(),
            path_prefix: "/x/".into(),
            service: "web".into(),
            strip_prefix: true,
            ..Default::default()
        };
        let n = mount(&m).unwrap();
        assert_eq!((n.host.as_str(), n.path_prefix.as_str()), ("a.test", "/x"));
        let bad = Mount {
            service: "Web".into(),
            ..m
        };
        assert_eq!(mount(&bad).unwrap_err().field, "service");
    }

    #[test]
    fn services_and_origins() {
        let mut s = Service {
            name: "web".into(),
            origins: vec![coordinator_api::Origin {
                url: "HTTPS://Origin.Test:8443/".into(),
                weight: Some(5),
                ..Default::default()
            }],
            ..Default::default()
        };
        assert_eq!(
            service(&s).unwrap().origins[0].url,
            "https://origin.test:8443"
        );
        for (bad, field) in [
            ("ftp://x.test", "origins.url"),
            ("x.test:80", "origins.url"),
            ("http://x.test/path", "origins.url"),
            ("http://u@x.test", "origins.url"),
            ("http://x.test/?q", "origins.url"),
        ] {
            s.origins[0].url = bad.into();
            assert_eq!(service(&s).unwrap_err().field, field, "{bad}");
        }
        s.origins[0].url = "http://x.test".into();
        s.origins[0].weight = Some(0);
        assert_eq!(service(&s).unwrap_err().field, "origins.weight");
        s.origins[0].weight = None;
        s.origins[0].ca = Some("/ca.pem".into());
        assert_eq!(service(&s).unwrap_err().field, "origins.ca");
        s.origins[0].ca = None;
        s.sticky = Some(coordinator_api::StickyCookie { name: "a b".into() });
        assert_eq!(service(&s).unwrap_err().field, "sticky.name");
        s.sticky = None;
        s.health_check = Some(coordinator_api::HealthCheck {
            path: "health".into(),
            ..Default::default()
        });
        assert_eq!(service(&s).unwrap_err().field, "health_check.path");
        s.health_check = Some(coordinator_api::HealthCheck {
            timeout_ms: 5_000,
            ..Default::default()
        });
        assert_eq!(service(&s).unwrap_err().field, "health_check.timeout_ms");
        s.health_check = None;
        s.concurrency = Some(coordinator_api::ConcurrencyLimits {
            soft: Some(10),
            hard: Some(5),
        });
        assert_eq!(service(&s).unwrap_err().field, "concurrency.soft");
        s.concurrency = None;
        assert!(service(&s).is_ok());
    }

    #[test]
    fn coordinates_on_the_globe() {
        assert!(coordinates(Some(52.3), Some(4.9)).is_ok());
        assert!(coordinates(None, None).is_ok());
        assert_eq!(coordinates(Some(91.0), None).unwrap_err().field, "latitude");
        assert_eq!(
            coordinates(None, Some(-181.0)).unwrap_err().field,
            "longitude"
        );
        assert!(coordinates(Some(f64::NAN), None).is_err());
    }
}
