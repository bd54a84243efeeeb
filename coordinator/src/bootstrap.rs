//! Startup: data directory, database, and the API tokens needed to reach the API at all.

use std::io::Write;
use std::path::{Path, PathBuf};

use coordinator_api::token;
use rand::Rng;
use tracing::{info, warn};

use crate::config::Config;
use crate::config::StoreKind;
use crate::error::Error;
use crate::store::{
    ApiTokenRow, EtcdOptions, EtcdStore, Scope, SqliteStore, Store, StoreError, StoreHandle,
};

pub(crate) const DB_FILE: &str = "coordinator.db";
pub(crate) const ADMIN_TOKEN_FILE: &str = "admin.token";
/// Longest API token accepted, from flags or `Authorization` headers.
pub(crate) const MAX_TOKEN_LEN: usize = 512;

const ID_CHARS: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
const SECRET_CHARS: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";

/// Random string over `chars` from the thread-local CSPRNG.
pub(crate) fn random_string(chars: &[u8], len: usize) -> String {
    let mut rng = rand::rng();
    (0..len)
        .map(|_| char::from(chars[rng.random_range(0..chars.len())]))
        .collect()
}

/// A fresh token id (no `_`, so it parses back out of the token).
pub(crate) fn new_token_id() -> String {
    random_string(ID_CHARS, 12)
}

/// A fresh secret: 32 alphanumerics, about 190 bits.
pub(crate) fn new_secret() -> String {
    random_string(SECRET_CHARS, 32)
}

/// Creates the data directory (0700) and opens the configured store: SQLite in the data
/// directory, or a connection to etcd. `node` names this coordinator in the leader key.
pub(crate) async fn open_store(cfg: &Config, node: String) -> Result<StoreHandle, Error> {
    let dir = cfg.data_dir.clone();
    let kind = cfg.store;
    let sqlite = tokio::task::spawn_blocking(move || {
        create_private_dir(&dir).map_err(|source| Error::DataDir {
            path: dir.clone(),
            source,
        })?;
        if kind != StoreKind::Sqlite {
            return Ok(None);
        }
        let store = SqliteStore::open(&dir.join(DB_FILE))?;
        Ok::<_, Error>(Some(StoreHandle::new(Box::new(store))))
    })
    .await
    .map_err(|e| Error::Config(format!("store open task failed: {e}")))??;
    if let Some(handle) = sqlite {
        return Ok(handle);
    }
    let store = EtcdStore::connect(EtcdOptions {
        endpoints: cfg.etcd_endpoints.clone(),
        prefix: cfg.etcd_prefix.clone(),
        lease_ttl: std::time::Duration::from_secs(cfg.etcd_lease_ttl),
        node,
    })
    .await?;
    Ok(StoreHandle::new(Box::new(store)))
}

fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
}

fn flag_token(name: &str, value: Option<&String>) -> Result<Option<String>, Error> {
    let Some(t) = value.map(|t| t.trim()) else {
        return Ok(None);
    };
    if t.is_empty() {
        warn!("{name} is set but empty; ignoring it");
        return Ok(None);
    }
    if t.len() > MAX_TOKEN_LEN || t.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(Error::Config(format!(
            "{name} must be at most {MAX_TOKEN_LEN} printable characters without spaces"
        )));
    }
    Ok(Some(t.to_owned()))
}

/// Ensures the bootstrap tokens exist with their scopes; if no admin token exists at all
/// afterwards, generates one and writes it to `<data-dir>/admin.token` (0600). Returns the
/// path of a generated token file, if any.
pub(crate) async fn tokens(store: &StoreHandle, cfg: &Config) -> Result<Option<PathBuf>, Error> {
    let admin = flag_token("--admin-token", cfg.admin_token.as_ref())?;
    let node = flag_token("--node-token", cfg.node_token.as_ref())?;
    if admin.is_some() && admin == node {
        return Err(Error::Config(
            "--admin-token and --node-token must differ".into(),
        ));
    }
    let now = crate::clock::unix_ms();
    let rows = [(admin, Scope::Admin), (node, Scope::Node)]
        .map(|(t, s)| t.map(|t| api_token_row(&t, s, "bootstrap (flag)", now)));
    let admins = store
        .call(move |s| {
            for row in rows.iter().flatten() {
                if put_bootstrap(s, row)? {
                    info!(
                        scope = row.scope.as_str(),
                        id = row.id,
                        "bootstrap API token registered"
                    );
                }
            }
            s.count_api_tokens(Scope::Admin)
        })
        .await?;
    if admins > 0 {
        return Ok(None);
    }

    let token = token::format(token::API, &new_token_id(), &new_secret());
    let path = cfg.data_dir.join(ADMIN_TOKEN_FILE);
    let p = path.clone();
    let t = token.clone();
    tokio::task::spawn_blocking(move || write_private(&p, &t))
        .await
        .map_err(|e| Error::Config(format!("token file task failed: {e}")))?
        .map_err(|source| Error::TokenFile {
            path: path.clone(),
            source,
        })?;
    let row = api_token_row(&token, Scope::Admin, "generated at first start", now);
    store.call(move |s| put_bootstrap(s, &row)).await?;
    info!(path = %path.display(), "no admin token configured; generated one and wrote it to this file (mode 0600)");
    Ok(Some(path))
}

/// The stored form of an API token: its id is the one in the token when it has one
/// (`mrd_api_<id>_<secret>`), else derived from the hash.
pub(crate) fn api_token_row(token: &str, scope: Scope, description: &str, now: u64) -> ApiTokenRow {
    let sha256 = token::sha256_hex(token);
    let id = token::parse_id(token::API, token)
        .map(str::to_owned)
        .unwrap_or_else(|| hash_id(&sha256));
    ApiTokenRow {
        id,
        sha256,
        scope,
        description: description.to_owned(),
        created_at_ms: now,
    }
}

fn hash_id(sha256: &str) -> String {
    format!("sha-{}", sha256.get(..12).unwrap_or(sha256))
}

/// Registers a bootstrap token; if its id is taken by another token, falls back to a
/// hash-derived id rather than refusing to start.
fn put_bootstrap(s: &mut dyn Store, row: &ApiTokenRow) -> Result<bool, StoreError> {
    match s.put_api_token(row) {
        Err(StoreError::Duplicate { .. }) => {
            let mut row = row.clone();
            row.id = hash_id(&row.sha256);
            s.put_api_token(&row)
        }
        r => r,
    }
}

/// Writes a secret file readable only by its owner, replacing any previous one atomically.
fn write_private(path: &Path, contents: &str) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut tmp_name = path
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_default();
    tmp_name.push(".tmp");
    let tmp = path.with_file_name(tmp_name);
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(contents.as_bytes())?;
    f.write_all(b"\n")?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}
