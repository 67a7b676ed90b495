//! NATS decentralised (JWT) auth made by the tests themselves: an operator, its system account
//! and an account with JetStream, their users' `.creds` files, and the server config that
//! trusts them, with every JWT signed by an ed25519 nkey the way `nsc` signs it.
//!
//! There is no `nsc` on the test machines, and the `nats-jwt` crate writes neither operator
//! claims nor JetStream limits, so the claims are written here with serde_json after the
//! schema of `github.com/nats-io/jwt/v2` and signed with the `nkeys` crate (the one async-nats
//! itself reads `.creds` files with). The server checks what `jwt.Decode` checks: the header's
//! `typ` and `alg`, the ed25519 signature over `HEADER.PAYLOAD` (base64url without padding),
//! the issuer's key prefix, and that the issuer is trusted (the operator for an account, the
//! account for a user). It does not recompute `jti`, which only has to be unique.
//!
//! ```ignore
//! let trust = nats::jwt::Operator::new("test");
//! let cluster = nats::Cluster::start_with(&server, &trust.server_config());
//! trust.user_creds(&dir.join("spoold.creds"), &[], &[]);
//! ```

use std::fs;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use data_encoding::BASE64URL_NOPAD;
use nkeys::KeyPair;
use serde_json::{Value, json};

/// An operator with its system account and one application account with unlimited JetStream,
/// as `nsc add operator --sys` and `nsc add account` followed by `nsc edit account
/// --js-mem-storage -1 --js-disk-storage -1 --js-streams -1 --js-consumer -1` make them.
pub struct Operator {
    key: KeyPair,
    jwt: String,
    system: Account,
    account: Account,
}

/// An account: its key pair and its JWT, signed by the operator.
pub struct Account {
    key: KeyPair,
    jwt: String,
}

impl Operator {
    /// A new operator named `name`, with the system account `SYS` and the account `APP`.
    pub fn new(name: &str) -> Operator {
        let key = KeyPair::new_operator();
        let system = Account::new(&key, "SYS", false);
        let account = Account::new(&key, "APP", true);
        let jwt = sign(
            &key,
            &key.public_key(),
            name,
            json!({
                "system_account": system.key.public_key(),
                "type": "operator",
                "version": 2,
            }),
        );
        Operator {
            key,
            jwt,
            system,
            account,
        }
    }

    /// The lines of a node's config that make the server require these JWTs from every
    /// client: the operator it trusts, its system account, and both accounts preloaded in a
    /// memory resolver (no account server to run).
    pub fn server_config(&self) -> String {
        format!(
            "operator: \"{}\"\nsystem_account: {}\nresolver: MEMORY\nresolver_preload: {{\n  \
             {}: \"{}\"\n  {}: \"{}\"\n}}\n",
            self.jwt,
            self.system.key.public_key(),
            self.system.key.public_key(),
            self.system.jwt,
            self.account.key.public_key(),
            self.account.jwt,
        )
    }

    /// Writes a `.creds` file at `path` for a new user of the application account, allowed
    /// to publish only on the subjects `publish` matches and to subscribe only on those
    /// `subscribe` matches; an empty list allows every subject, as in a JWT.
    pub fn user_creds(&self, path: &Path, publish: &[&str], subscribe: &[&str]) {
        self.account.user_creds(path, publish, subscribe);
    }

    /// Writes a `.creds` file at `path` for a user of an account this operator signed but
    /// [`Operator::server_config`] does not preload, so no server can resolve it.
    pub fn unknown_account_user_creds(&self, path: &Path) {
        Account::new(&self.key, "STRAY", true).user_creds(path, &[], &[]);
    }
}

impl Account {
    fn new(operator: &KeyPair, name: &str, jetstream: bool) -> Account {
        let key = KeyPair::new_account();
        // The limits nsc writes for a new account: -1 is "no limit". JetStream is enabled for
        // an account exactly when its memory or disk storage limit is not 0.
        let mut limits = json!({
            "subs": -1, "data": -1, "payload": -1,
            "imports": -1, "exports": -1, "wildcards": true,
            "conn": -1, "leaf": -1,
        });
        if jetstream {
            for field in ["mem_storage", "disk_storage", "streams", "consumer"] {
                limits[field] = json!(-1);
            }
        }
        let jwt = sign(
            operator,
            &key.public_key(),
            name,
            json!({
                "limits": limits,
                "default_permissions": { "pub": {}, "sub": {} },
                "type": "account",
                "version": 2,
            }),
        );
        Account { key, jwt }
    }

    /// Writes a `.creds` file at `path` for a new user of this account, in the format
    /// `nsc generate creds` writes (jwt's `FormatUserConfig`).
    fn user_creds(&self, path: &Path, publish: &[&str], subscribe: &[&str]) {
        let user = KeyPair::new_user();
        let allow = |subjects: &[&str]| {
            if subjects.is_empty() {
                json!({})
            } else {
                json!({ "allow": subjects })
            }
        };
        let jwt = sign(
            &self.key,
            &user.public_key(),
            "spoold",
            json!({
                "pub": allow(publish), "sub": allow(subscribe),
                "subs": -1, "data": -1, "payload": -1,
                "type": "user",
                "version": 2,
            }),
        );
        let seed = user.seed().expect("a new user key pair has a seed");
        let text = format!(
            "-----BEGIN NATS USER JWT-----\n{jwt}\n------END NATS USER JWT------\n\n\
             ************************* IMPORTANT *************************\n\
             NKEY Seed printed below can be used to sign and prove identity.\n\
             NKEYs are sensitive and should be treated as secrets.\n\n\
             -----BEGIN USER NKEY SEED-----\n{seed}\n------END USER NKEY SEED------\n\n\
             *************************************************************\n"
        );
        fs::write(path, text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    }
}

/// A v2 JWT with `nats` as its NATS-specific claims, issued by `issuer` for `subject`.
fn sign(issuer: &KeyPair, subject: &str, name: &str, nats: Value) -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("the clock is after 1970")
        .as_secs();
    // Unique per JWT; nsc uses a hash of the claims, which nothing checks.
    let jti: String = (0..52)
        .map(|_| char::from(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"[fastrand::usize(..32)]))
        .collect();
    let claims = json!({
        "jti": jti,
        "iat": now,
        "iss": issuer.public_key(),
        "name": name,
        "sub": subject,
        "nats": nats,
    });
    let header = BASE64URL_NOPAD.encode(br#"{"typ":"JWT","alg":"ed25519-nkey"}"#);
    let payload = BASE64URL_NOPAD.encode(claims.to_string().as_bytes());
    let signed = format!("{header}.{payload}");
    let signature = issuer
        .sign(signed.as_bytes())
        .expect("a key pair with a seed signs");
    format!("{signed}.{}", BASE64URL_NOPAD.encode(&signature))
}
