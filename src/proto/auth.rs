//! Challenge-response authentication with a shared secret.
//!
//! Both sides hold the same secret file. The shipper sends a fresh nonce; the
//! receiver answers with its own nonce and `HMAC-SHA256(SHA-256(secret),
//! "waltail receiver" | client nonce | server nonce)`; the shipper checks
//! that, then proves itself with `HMAC-SHA256(SHA-256(secret), "waltail
//! shipper" | server nonce | client nonce)`. The secret never crosses the wire, both sides prove they
//! know it, and a recorded exchange cannot be replayed because the other
//! side's nonce is new on every connection. Proofs are compared in constant time.

use std::path::Path;

use hmac::{Hmac, Mac};
use sha2::Sha256;

use super::frame::{NONCE_LEN, PROOF_LEN};

/// The shared secret, or none (`--insecure-no-auth`, for local demos only).
#[derive(Clone)]
pub struct Secret(Option<Vec<u8>>);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() {
            "Secret(..)"
        } else {
            "Secret(none)"
        })
    }
}

impl Secret {
    /// Reads a secret file (trailing newlines are ignored). It must hold at
    /// least 16 bytes.
    pub fn from_file(path: &Path) -> Result<Secret, String> {
        let raw = std::fs::read(path).map_err(|e| {
            let e = crate::access::explain(path, e);
            let fix = if e.kind() == std::io::ErrorKind::PermissionDenied {
                format!(
                    "; give it to the user the service runs as (chown {} {}), e.g. after an `scp -p` as root",
                    crate::access::me().split(' ').next().unwrap_or_default(),
                    path.display()
                )
            } else {
                String::new()
            };
            format!("cannot read secret file {}: {e}{fix}", path.display())
        })?;
        let mut s = raw.as_slice();
        while let [rest @ .., b'\n' | b'\r'] = s {
            s = rest;
        }
        if s.len() < 16 {
            return Err(format!(
                "secret file {} holds {} bytes; use at least 16 (e.g. head -c 32 /dev/urandom | base64 > {})",
                path.display(),
                s.len(),
                path.display()
            ));
        }
        Ok(Secret(Some(s.to_vec())))
    }

    pub fn from_bytes(b: &[u8]) -> Secret {
        Secret(Some(b.to_vec()))
    }

    /// No authentication: both sides must agree to run without it.
    pub fn insecure_none() -> Secret {
        Secret(None)
    }

    pub fn is_none(&self) -> bool {
        self.0.is_none()
    }

    fn mac(&self, label: &[u8], a: &[u8], b: &[u8]) -> Hmac<Sha256> {
        let secret: &[u8] = self.0.as_deref().unwrap_or(b"waltail-insecure-no-auth");
        // HMAC pads a short key with zeros, so "s" and "s\0" would be the
        // same key: key it with the secret's SHA-256 instead (found by the
        // handshake fuzz target).
        let key = <Sha256 as sha2::Digest>::digest(secret);
        let mut m = Hmac::<Sha256>::new_from_slice(&key).expect("HMAC takes keys of any length");
        m.update(label);
        m.update(a);
        m.update(b);
        m
    }

    pub fn receiver_proof(
        &self,
        client: &[u8; NONCE_LEN],
        server: &[u8; NONCE_LEN],
    ) -> [u8; PROOF_LEN] {
        self.mac(b"waltail receiver", client, server)
            .finalize()
            .into_bytes()
            .into()
    }

    pub fn shipper_proof(
        &self,
        client: &[u8; NONCE_LEN],
        server: &[u8; NONCE_LEN],
    ) -> [u8; PROOF_LEN] {
        self.mac(b"waltail shipper", server, client)
            .finalize()
            .into_bytes()
            .into()
    }

    pub fn verify_receiver(
        &self,
        client: &[u8; NONCE_LEN],
        server: &[u8; NONCE_LEN],
        proof: &[u8],
    ) -> bool {
        self.mac(b"waltail receiver", client, server)
            .verify_slice(proof)
            .is_ok()
    }

    pub fn verify_shipper(
        &self,
        client: &[u8; NONCE_LEN],
        server: &[u8; NONCE_LEN],
        proof: &[u8],
    ) -> bool {
        self.mac(b"waltail shipper", server, client)
            .verify_slice(proof)
            .is_ok()
    }
}

/// A fresh random nonce from the operating system.
pub fn nonce() -> [u8; NONCE_LEN] {
    let mut n = [0u8; NONCE_LEN];
    getrandom::getrandom(&mut n).expect("the OS random source works");
    n
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_secret_with_trailing_zero_bytes_is_another_secret() {
        let a = Secret::from_bytes(b"fuzzing-shared-secret-0123456789");
        let b = Secret::from_bytes(b"fuzzing-shared-secret-0123456789\0\0\0");
        let (c, s) = ([1u8; NONCE_LEN], [2u8; NONCE_LEN]);
        assert_ne!(a.receiver_proof(&c, &s), b.receiver_proof(&c, &s));
    }

    #[test]
    fn proofs_need_the_same_secret_and_fresh_nonces() {
        let a = Secret::from_bytes(b"0123456789abcdef-one");
        let b = Secret::from_bytes(b"0123456789abcdef-two");
        let (c, s) = (nonce(), nonce());
        let p = a.shipper_proof(&c, &s);
        assert!(a.verify_shipper(&c, &s, &p));
        assert!(!b.verify_shipper(&c, &s, &p));
        // Replayed against a new server nonce: refused.
        assert!(!a.verify_shipper(&c, &nonce(), &p));
        // A receiver proof is not a shipper proof.
        assert!(!a.verify_shipper(&c, &s, &a.receiver_proof(&c, &s)));
        assert!(!Secret::insecure_none().verify_shipper(&c, &s, &p));
    }

    #[test]
    fn secret_files_must_have_substance() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("s");
        std::fs::write(&p, "short\n").unwrap();
        assert!(Secret::from_file(&p).unwrap_err().contains("at least 16"));
        std::fs::write(&p, "long-enough-secret-value\n").unwrap();
        assert!(!Secret::from_file(&p).unwrap().is_none());
        assert!(Secret::from_file(&d.path().join("missing")).is_err());
    }
}
