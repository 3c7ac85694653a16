//! SCRAM-SHA-256 (RFC 5802, RFC 7677), the server's side, against a
//! verifier in the format of `pg_authid.rolpassword`:
//!
//! ```text
//! SCRAM-SHA-256$<iterations>:<salt, base64>$<StoredKey, base64>:<ServerKey, base64>
//! ```
//!
//! The verifier holds no password: only what proves a client knows it
//! (`H(ClientKey) = StoredKey`) and what proves the server had the verifier
//! (`ServerSignature = HMAC(ServerKey, AuthMessage)`). The exchange, as libpq
//! runs it:
//!
//! ```text
//! S: AuthenticationSASL ["SCRAM-SHA-256"]
//! C: SASLInitialResponse  "n,,n=,r=<client nonce>"   (gs2 "y,," when libpq has TLS but we offer no -PLUS)
//! S: AuthenticationSASLContinue "r=<client nonce><server nonce>,s=<salt>,i=<iterations>"
//! C: SASLResponse "c=<base64 gs2 header>,r=<nonce>,p=<ClientProof>"
//! S: AuthenticationSASLFinal "v=<ServerSignature>", AuthenticationOk
//! ```
//!
//! Channel binding (`-PLUS`, gs2 `p=`) is not offered; a client that insists
//! on it is refused. `waltail scram-verifier` makes a verifier with
//! postgres-protocol's `password::scram_sha_256`, as PostgreSQL's own
//! `\password` does.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

type HmacSha256 = Hmac<Sha256>;

/// A parsed SCRAM-SHA-256 verifier.
#[derive(Clone, PartialEq, Eq)]
pub struct Verifier {
    pub iterations: u32,
    pub salt: Vec<u8>,
    pub stored_key: [u8; 32],
    pub server_key: [u8; 32],
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Verifier(SCRAM-SHA-256, {} iterations)", self.iterations)
    }
}

impl std::str::FromStr for Verifier {
    type Err = String;

    fn from_str(s: &str) -> Result<Verifier, String> {
        let s = s.trim();
        let bad = |what: &str| {
            format!("not a SCRAM-SHA-256 verifier ({what}); expected SCRAM-SHA-256$<iterations>:<salt>$<storedkey>:<serverkey>, as `waltail scram-verifier` prints")
        };
        let rest = s
            .strip_prefix("SCRAM-SHA-256$")
            .ok_or_else(|| bad("no SCRAM-SHA-256$ prefix"))?;
        let (params, keys) = rest.split_once('$').ok_or_else(|| bad("no second '$'"))?;
        let (iter, salt) = params
            .split_once(':')
            .ok_or_else(|| bad("no ':' between iterations and salt"))?;
        let (stored, server) = keys
            .split_once(':')
            .ok_or_else(|| bad("no ':' between the keys"))?;
        let iterations: u32 = iter
            .parse()
            .ok()
            .filter(|&i| i > 0)
            .ok_or_else(|| bad("iterations is not a positive number"))?;
        let salt = B64
            .decode(salt)
            .map_err(|_| bad("the salt is not base64"))?;
        let key = |k: &str, name: &str| -> Result<[u8; 32], String> {
            B64.decode(k)
                .ok()
                .and_then(|v| <[u8; 32]>::try_from(v.as_slice()).ok())
                .ok_or_else(|| bad(&format!("{name} is not 32 bytes of base64")))
        };
        Ok(Verifier {
            iterations,
            salt,
            stored_key: key(stored, "StoredKey")?,
            server_key: key(server, "ServerKey")?,
        })
    }
}

/// Makes a verifier for `password` (random salt, PostgreSQL's 4096 iterations).
pub fn make_verifier(password: &str) -> String {
    postgres_protocol::password::scram_sha_256(password.as_bytes())
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AuthError {
    /// The proof did not match: a wrong password (or user).
    #[error("password authentication failed")]
    WrongPassword,
    /// The client broke the exchange; what was wrong.
    #[error("malformed SCRAM message: {0}")]
    Malformed(String),
}

fn hmac(key: &[u8], msg: &[u8]) -> [u8; 32] {
    let mut m = <HmacSha256 as Mac>::new_from_slice(key).expect("HMAC takes any key length");
    m.update(msg);
    m.finalize().into_bytes().into()
}

/// One server-side exchange, between the two client messages.
pub struct ScramServer<'a> {
    verifier: &'a Verifier,
    gs2_header: String,
    client_first_bare: String,
    server_first: String,
    nonce: String,
}

impl<'a> ScramServer<'a> {
    /// Takes the client-first-message; returns the exchange and the server-first-message.
    pub fn start(
        verifier: &'a Verifier,
        client_first: &[u8],
    ) -> Result<(ScramServer<'a>, String), AuthError> {
        let m = std::str::from_utf8(client_first)
            .map_err(|_| AuthError::Malformed("client-first-message is not UTF-8".into()))?;
        // gs2-header: cbind-flag "," [authzid] ","
        let mut parts = m.splitn(3, ',');
        let flag = parts.next().unwrap_or("");
        let authzid = parts.next();
        let bare = parts
            .next()
            .ok_or_else(|| AuthError::Malformed("client-first-message has no gs2 header".into()))?;
        match flag {
            "n" | "y" => {}
            f if f.starts_with("p=") => {
                return Err(AuthError::Malformed(
                    "channel binding (SCRAM-SHA-256-PLUS) was not offered".into(),
                ))
            }
            f => {
                return Err(AuthError::Malformed(format!(
                    "bad channel-binding flag {:?}",
                    f.chars().take(10).collect::<String>()
                )))
            }
        }
        if authzid.is_some_and(|a| !a.is_empty()) {
            return Err(AuthError::Malformed(
                "authorization identities are not supported".into(),
            ));
        }
        let cnonce = bare
            .split(',')
            .find_map(|a| a.strip_prefix("r="))
            .filter(|n| !n.is_empty() && n.bytes().all(|b| (0x21..=0x7e).contains(&b) && b != b','))
            .ok_or_else(|| AuthError::Malformed("client-first-message has no nonce".into()))?;
        if bare.starts_with("m=") {
            return Err(AuthError::Malformed(
                "mandatory extensions are not supported".into(),
            ));
        }
        let mut rnd = [0u8; 18];
        getrandom::getrandom(&mut rnd)
            .map_err(|e| AuthError::Malformed(format!("no randomness for the nonce: {e}")))?;
        let nonce = format!("{cnonce}{}", B64.encode(rnd));
        let server_first = format!(
            "r={nonce},s={},i={}",
            B64.encode(&verifier.salt),
            verifier.iterations
        );
        let s = ScramServer {
            verifier,
            gs2_header: format!("{flag},{},", authzid.unwrap_or("")),
            client_first_bare: bare.to_string(),
            server_first: server_first.clone(),
            nonce,
        };
        Ok((s, server_first))
    }

    /// Checks the client-final-message; returns the server-final-message.
    pub fn finish(self, client_final: &[u8]) -> Result<String, AuthError> {
        let m = std::str::from_utf8(client_final)
            .map_err(|_| AuthError::Malformed("client-final-message is not UTF-8".into()))?;
        let (without_proof, proof) = m
            .rsplit_once(",p=")
            .ok_or_else(|| AuthError::Malformed("client-final-message has no proof".into()))?;
        let mut binding = None;
        let mut nonce = None;
        for a in without_proof.split(',') {
            if let Some(v) = a.strip_prefix("c=") {
                binding = Some(v);
            } else if let Some(v) = a.strip_prefix("r=") {
                nonce = Some(v);
            }
        }
        if binding != Some(B64.encode(&self.gs2_header).as_str()) {
            return Err(AuthError::Malformed(
                "channel-binding data does not match the gs2 header".into(),
            ));
        }
        if nonce != Some(self.nonce.as_str()) {
            return Err(AuthError::Malformed("the nonce does not match".into()));
        }
        let proof = B64
            .decode(proof)
            .ok()
            .and_then(|p| <[u8; 32]>::try_from(p.as_slice()).ok())
            .ok_or_else(|| AuthError::Malformed("the proof is not 32 bytes of base64".into()))?;
        let auth_message = format!(
            "{},{},{}",
            self.client_first_bare, self.server_first, without_proof
        );
        let signature = hmac(&self.verifier.stored_key, auth_message.as_bytes());
        let mut client_key = [0u8; 32];
        for (i, k) in client_key.iter_mut().enumerate() {
            *k = proof[i] ^ signature[i];
        }
        let stored: [u8; 32] = Sha256::digest(client_key).into();
        // Constant time: no early exit on the first differing byte.
        let diff = stored
            .iter()
            .zip(self.verifier.stored_key.iter())
            .fold(0u8, |d, (a, b)| d | (a ^ b));
        if diff != 0 {
            return Err(AuthError::WrongPassword);
        }
        let server_sig = hmac(&self.verifier.server_key, auth_message.as_bytes());
        Ok(format!("v={}", B64.encode(server_sig)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};

    fn exchange(verifier: &str, password: &str, cb: ChannelBinding) -> Result<(), AuthError> {
        let v: Verifier = verifier.parse().unwrap();
        let mut client = ScramSha256::new(password.as_bytes(), cb);
        let (server, first) = ScramServer::start(&v, client.message())?;
        client.update(first.as_bytes()).unwrap();
        let fin = server.finish(client.message())?;
        // libpq's check: the server proved it holds the verifier.
        client.finish(fin.as_bytes()).unwrap();
        Ok(())
    }

    #[test]
    fn the_right_password_passes_and_the_server_proves_itself() {
        let v = make_verifier("s3cret pass");
        exchange(&v, "s3cret pass", ChannelBinding::unsupported()).unwrap();
        // libpq over TLS without -PLUS on offer says "y".
        exchange(&v, "s3cret pass", ChannelBinding::unrequested()).unwrap();
    }

    #[test]
    fn a_wrong_password_fails() {
        let v = make_verifier("right");
        assert_eq!(
            exchange(&v, "wrong", ChannelBinding::unsupported()),
            Err(AuthError::WrongPassword)
        );
    }

    #[test]
    fn postgresqls_own_verifier_format_parses() {
        // As `SELECT rolpassword FROM pg_authid` shows it.
        let v: Verifier = "SCRAM-SHA-256$4096:hRNFmDM0ycLbvKnQXfD4Ig==$0Lk5sOB1jybh2zs5ncW8yCkuusj79+2m2h1ZsHOvqfo=:ot9xVLWSA+BPOJ3aqcz6YtUJC52UUPMVlxEN1kfoMAg="
            .parse()
            .unwrap();
        assert_eq!(v.iterations, 4096);
        assert_eq!(v.salt.len(), 16);
        for bad in [
            "",
            "md5abc",
            "SCRAM-SHA-256$x:AAAA$AAAA:AAAA",
            "SCRAM-SHA-256$4096:AAAA$AAAA",
            "SCRAM-SHA-256$4096:!!$AAAA:AAAA",
            "SCRAM-SHA-256$4096:AAAA$AAAA:AAAA",
        ] {
            let e = bad.parse::<Verifier>().unwrap_err();
            assert!(e.contains("not a SCRAM-SHA-256 verifier"), "{bad}: {e}");
        }
    }

    #[test]
    fn malformed_client_messages_are_refused_with_the_reason() {
        let v: Verifier = make_verifier("x").parse().unwrap();
        for (msg, what) in [
            (&b"p=tls-server-end-point,,n=,r=abc"[..], "channel binding"),
            (b"n,,n=", "no nonce"),
            (b"garbage", "gs2 header"),
            (b"\xff\xfe", "UTF-8"),
        ] {
            match ScramServer::start(&v, msg) {
                Err(AuthError::Malformed(m)) => assert!(m.contains(what), "{m}"),
                other => panic!("{:?}", other.map(|_| ())),
            }
        }
        let (s, _) = ScramServer::start(&v, b"n,,n=,r=abc").unwrap();
        assert!(matches!(
            s.finish(b"c=biws,r=abc,p=AAAA"),
            Err(AuthError::Malformed(_))
        ));
    }
}
