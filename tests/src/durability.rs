//! The write burst of the coordinator durability suites (SQLite and etcd): concurrent writers,
//! a SIGKILL in the middle, and the writes the coordinator acknowledged, to look for afterwards.

use std::collections::HashSet;
use std::process::Child;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use coordinator_api::{Client, CreateService, Mount};

use crate::dev::eventually;

/// Eight writers create services and their mounts through `c` until `min_acked` writes are
/// acknowledged; then `child` (the coordinator) is killed with SIGKILL while more are in flight.
/// Returns every acknowledged write as `service NAME` or `mount HOST/PREFIX` (see [`present`]).
pub async fn write_burst_then_kill(
    c: &Client,
    round: usize,
    min_acked: usize,
    child: &mut Child,
) -> Vec<String> {
    let acked: Arc<Mutex<Vec<String>>> = Arc::default();
    let killed = Arc::new(AtomicBool::new(false));
    let mut writers = Vec::new();
    for w in 0..8 {
        let c = c.clone();
        let acked = acked.clone();
        let killed = killed.clone();
        writers.push(tokio::spawn(async move {
            for i in 0.. {
                if killed.load(Ordering::Relaxed) {
                    return;
                }
                let name = format!("r{round}-w{w}-{i}");
                let svc = c
                    .create_service(&CreateService {
                        name: name.clone(),
                        lb_policy: Default::default(),
                    })
                    .await;
                if svc.is_err() {
                    return;
                }
                acked.lock().unwrap().push(format!("service {name}"));
                let m = c
                    .add_mount(&Mount {
                        host: format!("{name}.test"),
                        path_prefix: "/".into(),
                        service: name.clone(),
                        strip_prefix: false,
                        ..Default::default()
                    })
                    .await;
                if m.is_err() {
                    return;
                }
                acked.lock().unwrap().push(format!("mount {name}.test/"));
            }
        }));
    }
    // Kill once a good number of writes are acknowledged, with more still in flight.
    eventually(Duration::from_secs(60), || async {
        (acked.lock().unwrap().len() >= min_acked).then_some(())
    })
    .await
    .expect("writes were not acknowledged");
    child.kill().unwrap(); // SIGKILL
    killed.store(true, Ordering::Relaxed);
    child.wait().unwrap();
    for w in writers {
        w.await.unwrap();
    }
    acked.lock().unwrap().clone()
}

/// The services and mounts the coordinator holds, in [`write_burst_then_kill`]'s form.
pub async fn present(c: &Client) -> HashSet<String> {
    let mut present: HashSet<String> = c
        .list_services()
        .await
        .unwrap()
        .into_iter()
        .map(|s| format!("service {}", s.name))
        .collect();
    present.extend(
        c.list_mounts()
            .await
            .unwrap()
            .into_iter()
            .map(|m| format!("mount {}{}", m.host, m.path_prefix)),
    );
    present
}
