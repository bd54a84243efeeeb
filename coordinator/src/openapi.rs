//! `GET /openapi.json`: the API described by hand, embedded at build time. A test checks that
//! every route the router declares is in it, so the document cannot silently fall behind.

use axum::http::header;
use axum::response::IntoResponse;

pub(crate) const DOCUMENT: &str = include_str!("../assets/openapi.json");

pub(crate) async fn serve() -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "application/json"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        DOCUMENT,
    )
}

#[cfg(test)]
mod tests {
    use super::DOCUMENT;

    /// `(method, path)` of every `.route(...)` in api.rs, read from its source text.
    fn declared_routes() -> Vec<(String, String)> {
        let src = include_str!("api.rs");
        let mut out = Vec::new();
        let mut rest = src;
        while let Some(i) = rest.find(".route(") {
            rest = &rest[i + ".route(".len()..];
            let Some(q1) = rest.find('"') else { break };
            let after = &rest[q1 + 1..];
            let Some(q2) = after.find('"') else { break };
            let path = after[..q2].to_owned();
            // The handler expression runs to the matching `)` of `.route(`.
            let mut depth = 1usize;
            let mut end = 0;
            for (j, c) in rest.char_indices() {
                match c {
                    '(' => depth += 1,
                    ')' => {
                        depth -= 1;
                        if depth == 0 {
                            end = j;
                            break;
                        }
                    }
                    _ => {}
                }
            }
            let handler = &rest[q1 + q2 + 2..end];
            for m in ["get", "post", "put", "delete", "patch"] {
                let starts = handler.starts_with(&format!(", {m}("))
                    || handler.starts_with(&format!(",\n{m}("))
                    || handler
                        .trim_start_matches([',', ' ', '\n'])
                        .starts_with(&format!("{m}("));
                if starts || handler.contains(&format!(".{m}(")) {
                    out.push((m.to_owned(), path.clone()));
                }
            }
        }
        out
    }

    #[test]
    fn every_route_is_documented() {
        let doc: serde_json::Value = serde_json::from_str(DOCUMENT).expect("valid JSON");
        assert_eq!(doc["openapi"], "3.1.0");
        let routes = declared_routes();
        assert!(routes.len() >= 20, "parsed too few routes: {routes:?}");
        for (method, path) in &routes {
            assert!(
                doc["paths"][path][method].is_object(),
                "{method} {path} is routed but missing from openapi.json"
            );
        }
        // And nothing documented that is not routed.
        let paths = doc["paths"].as_object().expect("paths");
        for (path, ops) in paths {
            for method in ops.as_object().expect("operations").keys() {
                assert!(
                    routes.iter().any(|(m, p)| m == method && p == path),
                    "{method} {path} is documented but not routed"
                );
            }
        }
        // Every $ref resolves.
        let text = DOCUMENT;
        let mut rest = text;
        while let Some(i) = rest.find("\"$ref\": \"#/components/") {
            rest = &rest[i + "\"$ref\": \"#/components/".len()..];
            let end = rest.find('"').expect("ref end");
            let mut node = &doc["components"];
            for part in rest[..end].split('/') {
                node = &node[part];
            }
            assert!(!node.is_null(), "dangling $ref {}", &rest[..end]);
        }
    }
}
