//! Weighted traffic splits on one mount: a 95/5 canary lands within tolerance over many
//! requests, and a blue-green switch (100/0 → 0/100 through `meridian ctl mount update`) under
//! continuous load fails no request.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use meridian_tests::dev::{DevNetwork, Proc, demo_app, eventually, start_agent};

const EDGE_HTTP: &str = "127.0.0.12:8080";
const HOST: &str = "edge.meridian.test";

type Conn = hyper::client::conn::http1::SendRequest<Empty<Bytes>>;

async fn conn() -> Conn {
    let tcp = tokio::net::TcpStream::connect(EDGE_HTTP).await.unwrap();
    let (sender, c) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(c);
    sender
}

/// `GET path` on a keep-alive connection: (status, the demo app instance that answered).
async fn get(c: &mut Conn, path: &str) -> (u16, String) {
    let req = hyper::Request::get(path)
        .header("host", HOST)
        .body(Empty::new())
        .unwrap();
    if c.ready().await.is_err() {
        return (0, String::new());
    }
    let resp = match c.send_request(req).await {
        Ok(r) => r,
        Err(e) => {
            eprintln!("request failed: {e:?}");
            return (0, String::new());
        }
    };
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.map(|b| b.to_bytes());
    let instance = body
        .ok()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .and_then(|v| v["instance"].as_str().map(str::to_owned))
        .unwrap_or_default();
    (status, instance)
}

#[tokio::test(flavor = "multi_thread")]
async fn canary_split_and_blue_green_switch() {
    let net = DevNetwork::start();
    let mut procs: Vec<Proc> = Vec::new();
    for (svc, port) in [("blue", 7795), ("green", 7796)] {
        net.ctl(&["service", "create", svc]);
        // A plain mount per service, to know when each one is served.
        net.ctl(&[
            "mount",
            "add",
            &format!("{HOST}/only-{svc}"),
            svc,
            "--strip-prefix",
        ]);
        let token = net.ctl(&["token", "create", svc])["token"]
            .as_str()
            .unwrap()
            .to_owned();
        let listen = format!("127.0.0.1:{port}");
        procs.push(demo_app(&listen, svc));
        procs.push(Proc(start_agent(
            &net,
            &token,
            svc,
            &format!("http://{listen}"),
            &[],
        )));
    }
    for svc in ["blue", "green"] {
        let path = format!("/only-{svc}/");
        let ok = eventually(Duration::from_secs(30), || {
            let path = path.clone();
            async move {
                let mut c = conn().await;
                (get(&mut c, &path).await == (200, svc.to_owned())).then_some(())
            }
        })
        .await;
        assert!(ok.is_some(), "{svc} served within 30 s");
    }

    // Canary: 95/5.
    net.ctl(&[
        "mount",
        "add",
        &format!("{HOST}/app"),
        "blue",
        "--strip-prefix",
        "--split",
        "blue=95",
        "--split",
        "green=5",
    ]);
    let path = "/app/";
    eventually(Duration::from_secs(10), || async {
        let mut c = conn().await;
        (get(&mut c, path).await.0 == 200).then_some(())
    })
    .await
    .expect("split mount served");
    const N: usize = 1000;
    let mut c = conn().await;
    let mut counts: HashMap<String, usize> = HashMap::new();
    for _ in 0..N {
        let (status, instance) = get(&mut c, path).await;
        assert_eq!(status, 200);
        *counts.entry(instance).or_default() += 1;
    }
    let green = counts.get("green").copied().unwrap_or(0);
    let blue = counts.get("blue").copied().unwrap_or(0);
    eprintln!("95/5 over {N}: blue {blue}, green {green}");
    assert_eq!(blue + green, N, "{counts:?}");
    // Expected 50, sd ~6.9: ±4 sd.
    assert!((22..=78).contains(&green), "green got {green} of {N}");

    // Blue-green: 100/0, then 0/100 under load.
    let update = |b: &str, g: &str| {
        net.ctl(&[
            "mount",
            "update",
            &format!("{HOST}/app"),
            "blue",
            "--strip-prefix",
            "--split",
            &format!("blue={b}"),
            "--split",
            &format!("green={g}"),
        ]);
    };
    update("100", "0");
    eventually(Duration::from_secs(10), || async {
        let mut c = conn().await;
        let all_blue = {
            let mut all = true;
            for _ in 0..50 {
                all &= get(&mut c, path).await == (200, "blue".to_owned());
            }
            all
        };
        all_blue.then_some(())
    })
    .await
    .expect("100/0 takes effect");

    let stop = Arc::new(AtomicBool::new(false));
    let failed = Arc::new(AtomicUsize::new(0));
    let total = Arc::new(AtomicUsize::new(0));
    let last = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let mut workers = Vec::new();
    for _ in 0..4 {
        let (stop, failed, total, last) =
            (stop.clone(), failed.clone(), total.clone(), last.clone());
        workers.push(tokio::spawn(async move {
            let mut c = conn().await;
            while !stop.load(Ordering::Relaxed) {
                let (status, instance) = get(&mut c, path).await;
                total.fetch_add(1, Ordering::Relaxed);
                if status != 200 {
                    failed.fetch_add(1, Ordering::Relaxed);
                    c = conn().await;
                }
                let mut l = last.lock().unwrap();
                l.push(instance);
                if l.len() > 200 {
                    l.remove(0);
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = total.load(Ordering::Relaxed);
    let t = Instant::now();
    update("0", "100");
    let switched = eventually(Duration::from_secs(10), || {
        let last = last.clone();
        async move {
            let l = last.lock().unwrap();
            (l.len() >= 200 && l.iter().all(|i| i == "green")).then_some(())
        }
    })
    .await;
    let took = t.elapsed();
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.await.unwrap();
    }
    let (total, failed) = (
        total.load(Ordering::Relaxed),
        failed.load(Ordering::Relaxed),
    );
    eprintln!(
        "blue-green switch: {total} requests ({before} before the update), {failed} failed, all green after {took:?}"
    );
    assert!(switched.is_some(), "traffic moved entirely to green");
    assert_eq!(failed, 0, "no request failed during the switch");
    drop(procs);
}
