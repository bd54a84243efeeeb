//! Raw TCP services from the coordinator (`Service::tcp_ports`): listeners opened and closed as
//! snapshots change, so `meridian dev` users need no edge flags. Each is served like a
//! `--tcp-service` listener (see `tunnel::serve_tcp`); the flag wins for a port both name.
//!
//! [`plan`] is sans-IO; [`follow`] is the thin driver.

use std::collections::{BTreeMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use coordinator_api::{Service, Snapshot};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::state::Shared;

/// Coordinator TCP ports one edge listens on at most (a bound on sockets a snapshot can open).
const MAX_PORTS: usize = 1024;

/// What one port should carry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Wanted {
    pub(crate) service: String,
    pub(crate) proxy_protocol: bool,
}

/// The ports `services` ask for, minus `reserved` (the edge's own `--tcp-service` ports) and
/// port 0; the first service naming a port wins, and at most [`MAX_PORTS`] are kept.
pub(crate) fn desired(services: &[Service], reserved: &HashSet<u16>) -> BTreeMap<u16, Wanted> {
    let mut out = BTreeMap::new();
    for s in services {
        for p in &s.tcp_ports {
            if p.port == 0 || reserved.contains(&p.port) || out.contains_key(&p.port) {
                continue;
            }
            if out.len() == MAX_PORTS {
                return out;
            }
            out.insert(
                p.port,
                Wanted {
                    service: s.name.clone(),
                    proxy_protocol: p.proxy_protocol,
                },
            );
        }
    }
    out
}

/// Listeners to open and to close to go from `current` to `desired`; a port whose service or
/// PROXY setting changed is in both (the new listener binds first: `SO_REUSEPORT`).
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Plan {
    pub(crate) open: Vec<(u16, Wanted)>,
    pub(crate) close: Vec<u16>,
}

pub(crate) fn plan(current: &BTreeMap<u16, Wanted>, desired: &BTreeMap<u16, Wanted>) -> Plan {
    let mut p = Plan::default();
    for (port, w) in desired {
        if current.get(port) != Some(w) {
            p.open.push((*port, w.clone()));
        }
    }
    for (port, w) in current {
        if desired.get(port) != Some(w) {
            p.close.push(*port);
        }
    }
    p
}

/// Keeps coordinator TCP listeners on `ip` in line with each snapshot until `shutdown`. A port
/// that cannot be bound (in use) is logged and tried again with the next snapshot.
pub(crate) async fn follow(
    mut snapshots: watch::Receiver<Option<Arc<Snapshot>>>,
    shared: Arc<Shared>,
    ip: IpAddr,
    reserved: HashSet<u16>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    let mut current: BTreeMap<u16, (Wanted, CancellationToken)> = BTreeMap::new();
    loop {
        let snap = snapshots.borrow_and_update().clone();
        if let Some(snap) = snap {
            let want = desired(&snap.services, &reserved);
            let have = current
                .iter()
                .map(|(p, (w, _))| (*p, w.clone()))
                .collect::<BTreeMap<_, _>>();
            let Plan { open, close } = plan(&have, &want);
            let mut opened = Vec::new();
            for (port, w) in open {
                let addr = SocketAddr::new(ip, port);
                match crate::listen::tcp(addr) {
                    Ok(listener) => {
                        info!(%addr, service = %w.service, proxy_protocol = w.proxy_protocol, "TCP service listening");
                        let stop = shutdown.child_token();
                        tracker.spawn(crate::tunnel::serve_tcp_until(
                            crate::tunnel::TcpServiceListener {
                                listener,
                                service: w.service.clone(),
                                proxy_protocol: w.proxy_protocol,
                            },
                            shared.clone(),
                            stop.clone(),
                            shutdown.clone(),
                            tracker.clone(),
                        ));
                        opened.push((port, (w, stop)));
                    }
                    Err(e) => {
                        warn!(%addr, service = %w.service, error = %e, "cannot listen for a TCP service; retrying with the next snapshot");
                    }
                }
            }
            for port in close {
                // A changed port whose new listener failed keeps its old one.
                if want.contains_key(&port) && !opened.iter().any(|(p, _)| *p == port) {
                    continue;
                }
                if let Some((w, stop)) = current.remove(&port) {
                    info!(port, service = %w.service, "TCP service closed");
                    stop.cancel();
                }
            }
            current.extend(opened);
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            changed = snapshots.changed() => if changed.is_err() { return },
        }
    }
}

#[cfg(test)]
mod tests {
    use coordinator_api::TcpPort;

    use super::*;

    fn svc(name: &str, ports: &[(u16, bool)]) -> Service {
        Service {
            name: name.into(),
            tcp_ports: ports
                .iter()
                .map(|&(port, proxy_protocol)| TcpPort {
                    port,
                    proxy_protocol,
                })
                .collect(),
            ..Default::default()
        }
    }

    fn w(service: &str, proxy_protocol: bool) -> Wanted {
        Wanted {
            service: service.into(),
            proxy_protocol,
        }
    }

    #[test]
    fn desired_skips_reserved_zero_and_duplicates() {
        let reserved = HashSet::from([6390]);
        let d = desired(
            &[
                svc("redis", &[(6379, false), (6390, false), (0, false)]),
                svc("pg", &[(5432, true), (6379, true)]),
            ],
            &reserved,
        );
        assert_eq!(
            d.into_iter().collect::<Vec<_>>(),
            vec![(5432, w("pg", true)), (6379, w("redis", false))]
        );
    }

    #[test]
    fn desired_is_bounded() {
        let ports: Vec<(u16, bool)> = (1..=2000).map(|p| (p, false)).collect();
        assert_eq!(
            desired(&[svc("many", &ports)], &HashSet::new()).len(),
            MAX_PORTS
        );
    }

    #[test]
    fn plan_opens_closes_and_rebinds_changes() {
        let cur = BTreeMap::from([(1, w("a", false)), (2, w("b", false)), (3, w("c", false))]);
        let want = BTreeMap::from([(1, w("a", false)), (2, w("b", true)), (4, w("d", false))]);
        assert_eq!(
            plan(&cur, &want),
            Plan {
                open: vec![(2, w("b", true)), (4, w("d", false))],
                close: vec![2, 3],
            }
        );
        assert_eq!(plan(&want, &want), Plan::default());
    }
}
