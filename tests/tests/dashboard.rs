//! The coordinator's dashboard in a real headless Chromium: it shows the dev regions and the
//! demo service with its agent, and killing the demo agent shows up within seconds.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{process::Command, time::Duration};

use meridian_tests::{
    dev::{DevNetwork, eventually, kill9},
    have_tool,
};

/// Loads `url` in headless Chromium, lets the page run for `budget_ms` of virtual time (its
/// fetches are real), and returns the DOM as it is then.
fn dump_dom(url: &str, budget_ms: u32) -> String {
    let profile = tempfile::tempdir().unwrap();
    let out = Command::new("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg(format!("--virtual-time-budget={budget_ms}"))
        .arg("--dump-dom")
        .arg(url)
        .output()
        .expect("run chromium");
    assert!(
        out.status.success(),
        "chromium failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn dashboard_shows_regions_services_and_a_dead_agent() {
    if !have_tool("chromium") {
        return;
    }
    let net = DevNetwork::start();
    let url = format!("http://127.0.0.1:7700/#token={}", net.admin_token());

    // Wait for the demo agent to be reported before looking (the readiness signal is the API).
    let dom = eventually(Duration::from_secs(30), || async {
        let dom = dump_dom(&url, 3000);
        dom.contains(r#"data-service="demo" data-agents="1""#)
            .then_some(dom)
    })
    .await
    .unwrap_or_else(|| {
        panic!(
            "demo service with its agent never appeared:\n{}",
            dump_dom(&url, 3000)
        )
    });
    for region in ["ams", "iad", "sin"] {
        assert!(
            dom.contains(&format!(r#"data-region="{region}" data-health="healthy""#)),
            "region {region} missing or unhealthy:\n{dom}"
        );
    }
    assert!(dom.contains(r#"data-region-service="demo""#), "{dom}");
    assert!(dom.contains(r#"<div id="error"></div>"#), "{dom}");

    // Without the token the page loads but shows no data.
    let bare = dump_dom("http://127.0.0.1:7700/", 2000);
    assert!(bare.contains(r#"<div id="error">No token"#), "{bare}");
    assert!(!bare.contains(r#"data-service="demo""#));

    kill9(net.pid("agent"));
    let started = std::time::Instant::now();
    // The edge notices a SIGKILLed agent when its QUIC connection times out (as in
    // dev_network.rs); the dashboard must follow within a poll of that.
    eventually(Duration::from_secs(30), || async {
        dump_dom(&url, 1500)
            .contains(r#"data-service="demo" data-agents="0""#)
            .then_some(())
    })
    .await
    .expect("the dead agent never showed on the dashboard");
    eprintln!(
        "agent death visible on the dashboard after {:?}",
        started.elapsed()
    );
}
