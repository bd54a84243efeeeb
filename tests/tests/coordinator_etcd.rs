//! No acknowledged write is lost with the etcd backend either: a real `meridian coordinator
//! --store etcd` process on a real 3-member etcd cluster is killed with SIGKILL in the middle of
//! a concurrent write burst, restarted, and every write it acknowledged must be there.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../../coordinator/tests/support/etcd_cluster.rs"]
mod etcd_cluster;

use std::{
    net::{SocketAddr, TcpListener},
    process::{Child, Command, Stdio},
    time::Duration,
};

use coordinator_api::Client;
use etcd_cluster::EtcdCluster;
use meridian_tests::durability::{present, write_burst_then_kill};
use meridian_tests::{dev::eventually, have_tool, meridian_bin};

const ADMIN: &str = "mrd_api_etcddurable_etcddurabilitysecret";
/// Client ports 23730, 23732, 23734 (peers one above each): not used by any other suite.
const ETCD_BASE_PORT: u16 = 23730;

fn free_addr() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

fn start(addr: SocketAddr, data: &std::path::Path, etcd: &EtcdCluster) -> Child {
    Command::new(meridian_bin())
        .args(["coordinator", "--listen", &addr.to_string(), "--data-dir"])
        .arg(data)
        .args(["--store", "etcd", "--etcd-prefix", "/durable"])
        .args(["--etcd-endpoints", &etcd.endpoints.join(",")])
        .env("MERIDIAN_ADMIN_TOKEN", ADMIN)
        .env("MERIDIAN_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start meridian coordinator")
}

async fn ready(c: &Client) {
    eventually(Duration::from_secs(30), || async {
        c.list_services().await.ok().map(drop)
    })
    .await
    .expect("coordinator did not come up");
}

#[tokio::test(flavor = "multi_thread")]
async fn etcd_backed_kill_9_during_a_write_burst_loses_no_acknowledged_write() {
    if !have_tool("etcd") {
        return;
    }
    let etcd = EtcdCluster::start("durability", ETCD_BASE_PORT, 3);
    let data = tempfile::tempdir().unwrap();
    let addr = free_addr();
    let c = Client::new(format!("http://{addr}"), ADMIN).unwrap();
    let mut all_acked: Vec<String> = Vec::new();

    for round in 0..2 {
        let mut child = start(addr, data.path(), &etcd);
        ready(&c).await;
        all_acked.extend(write_burst_then_kill(&c, round, 100, &mut child).await);

        let mut child = start(addr, data.path(), &etcd);
        ready(&c).await;
        let present = present(&c).await;
        let lost: Vec<&String> = all_acked.iter().filter(|w| !present.contains(*w)).collect();
        assert!(
            lost.is_empty(),
            "round {round}: {} of {} acknowledged writes lost, e.g. {:?}",
            lost.len(),
            all_acked.len(),
            &lost[..lost.len().min(5)]
        );
        // etcd's revision counts every committed change, so it is at least the acked ones.
        let snap = c.snapshot().await.unwrap();
        assert!(
            snap.revision as usize >= all_acked.len(),
            "{}",
            snap.revision
        );
        assert_eq!(c.status().await.unwrap().backend, "etcd");
        child.kill().unwrap();
        child.wait().unwrap();
    }
}
