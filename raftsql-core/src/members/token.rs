//! Join tokens: 128 random bits shown once; the leader keeps only keys derived from them,
//! and both sides prove what they hold with HMACs over fresh nonces.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hmac::{Hmac, Mac};
use raftsql_proto::v1 as pb;
use sha2::{Digest, Sha256};

use super::registry::{read_registry, seed_registry, sql, SCHEMA};
use super::SYSTEM_DB;
use crate::error::{Error, Result};
use crate::node::Node;

/// A token's lifetime unless the request says otherwise.
pub const DEFAULT_TOKEN_TTL: Duration = Duration::from_secs(3600);

pub(super) fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// (id, HMAC key) derived from a token's secret.
pub(super) fn derive(secret: &[u8]) -> (Vec<u8>, Vec<u8>) {
    let id = Sha256::new()
        .chain_update(b"raftsql join id\0")
        .chain_update(secret)
        .finalize()[..16]
        .to_vec();
    let key = Sha256::new()
        .chain_update(b"raftsql join key\0")
        .chain_update(secret)
        .finalize()
        .to_vec();
    (id, key)
}

/// HMAC-SHA256 over length-prefixed `parts` (so that part boundaries are unambiguous).
fn mac(key: &[u8], parts: &[&[u8]]) -> Hmac<Sha256> {
    let mut m = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes any key length");
    for p in parts {
        m.update(&(p.len() as u64).to_le_bytes());
        m.update(p);
    }
    m
}

pub(super) fn hmac(key: &[u8], parts: &[&[u8]]) -> Vec<u8> {
    mac(key, parts).finalize().into_bytes().to_vec()
}

/// Constant-time check of a tag made by [`hmac`].
pub(super) fn hmac_ok(key: &[u8], parts: &[&[u8]], tag: &[u8]) -> bool {
    mac(key, parts).verify_slice(tag).is_ok()
}

pub(super) fn parse_token(token: &str) -> Result<Vec<u8>> {
    let t = token.trim();
    if t.len() != 32 || !t.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(Error::Invalid(
            "malformed join token: expected 32 hexadecimal digits".into(),
        ));
    }
    Ok((0..16)
        .map(|i| u8::from_str_radix(&t[2 * i..2 * i + 2], 16).unwrap())
        .collect())
}

/// Leader: a new join token.
pub(super) async fn create_token(
    node: &Node,
    r: pb::CreateTokenRequest,
) -> Result<pb::CreateTokenResponse> {
    let ttl = if r.ttl_ms == 0 {
        DEFAULT_TOKEN_TTL
    } else {
        Duration::from_millis(r.ttl_ms)
    };
    let secret: [u8; 16] = rand::random();
    let (id, key) = derive(&secret);
    let now = now_ms();
    let expires = now + ttl.as_millis() as i64;
    let reusable = r.reusable;
    seed_registry(node).await?;
    let members = node
        .write(SYSTEM_DB, move |c| {
            c.execute_batch(SCHEMA).map_err(sql)?;
            c.execute("DELETE FROM join_tokens WHERE expires_ms < ?1", [now])
                .map_err(sql)?;
            c.execute(
                "INSERT INTO join_tokens(id, key, expires_ms, reusable) VALUES (?1, ?2, ?3, ?4)",
                rusqlite::params![id, key, expires, reusable],
            )
            .map_err(sql)?;
            read_registry(c)
        })
        .await?;
    tracing::info!(
        "issued a join token valid for {} s{}",
        ttl.as_secs(),
        if reusable { " (reusable)" } else { "" }
    );
    Ok(pb::CreateTokenResponse {
        token: secret.iter().map(|b| format!("{b:02x}")).collect(),
        expires_unix_ms: expires as u64,
        addrs: members.into_iter().map(|m| m.addr).collect(),
        ca_fingerprint: node
            .tls_material()
            .map(|m| m.ca.fingerprint_hex())
            .unwrap_or_default(),
    })
}
