//! Input validation and normalisation for the admin API; pure, so every rule is unit tested.
//!
//! Errors name the request field at fault so `meridian ctl` can point at it.

use coordinator_api::{ApiError, Mount};

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
    Ok(Mount {
        host,
        path_prefix,
        service: m.service.clone(),
        strip_prefix: m.strip_prefix,
    })
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
