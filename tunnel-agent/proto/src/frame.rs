//! The frames of the tunnel protocol.

use bytes::Bytes;

/// Header list in wire order; names are lower-case ASCII, values arbitrary bytes.
pub type Headers = Vec<(Bytes, Bytes)>;

/// Where an agent can reach another edge (listed in `Welcome` so agents spread over regions).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EdgeEndpoint {
    pub edge_id: String,
    pub region: String,
    /// `ip:port` of that edge's tunnel listener.
    pub addr: String,
}

/// Head of a proxied HTTP request (edge → agent).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequestHead {
    pub service: String,
    pub method: Bytes,
    /// Origin-form: path and query, prefix already stripped when the mount says so.
    pub uri: Bytes,
    pub headers: Headers,
}

/// Head of a proxied HTTP response (agent → edge).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResponseHead {
    pub status: u16,
    pub headers: Headers,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Frame {
    // ---- control stream ----
    /// Agent → edge, first frame on the control stream.
    Hello {
        version: u8,
        token: String,
        agent_id: String,
        services: Vec<String>,
    },
    /// Edge → agent: registered.
    Welcome {
        edge_id: String,
        region: String,
        other_edges: Vec<EdgeEndpoint>,
    },
    /// Edge → agent: not registered; the connection closes after it.
    Reject {
        reason: String,
    },
    Heartbeat {
        seq: u64,
    },
    HeartbeatAck {
        seq: u64,
    },
    /// Agent → edge: its origin for `service` became healthy or unhealthy.
    OriginHealth {
        service: String,
        healthy: bool,
    },
    /// Either side: take no new streams on this connection; finish in-flight ones.
    Drain,
    /// Either side: closing now, with a reason.
    GoAway {
        reason: String,
    },

    // ---- data streams ----
    RequestHead(RequestHead),
    /// Raw TCP to the service's TCP origin; raw bytes follow.
    TcpHead {
        service: String,
    },
    ResponseHead(ResponseHead),
    /// Agent → edge instead of a response head: the origin could not be reached.
    Error {
        code: u16,
        message: String,
    },
    Data(Bytes),
    Trailers(Headers),
    /// End of this direction's body.
    End,
}
